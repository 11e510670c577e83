"""The whole pipeline in one call (the README's main command): generate -> train -> extract -> attribute,
then a self-contained Markdown report with every stage's figures, numbers and wall time.

Each stage is itself resumable; the runner records finished stages in pipeline_state.json and skips them on a
rerun, so an interrupted `make demo` continues where it stopped.
"""
from __future__ import annotations

import json
import time

from pathlib import Path

from ..diffusion.sampling import DEFAULT_DDIM_STEPS, SamplerConfig
from ..io.checkpoints import load_checkpoint
from ..io.device import pick_device
from ..io.distributed import naming_rank, start as start_ranks
from ..io.errors import PipelineError
from ..io.files import atomic_write_json, atomic_write_text, prepare_output_dir, sha256_file
from ..io.paths import DEFAULT_CLASSIFIER, DEFAULT_STUDENT
from ..io.records import software_versions
from ..training.student import StudentTrainOptions, train_student, training_phases
from .attribution import AttributionOptions, attribution_generation
from .features import FeatureOptions, extract_reference_features
from .generate import GenerateOptions, generate_training_data

STAGES = ("generate", "train", "extract", "attribute")
CLASS_PANEL_STRENGTH = 0.75  # the report's class panel: where the default hook style reaches its class (BENCHMARKS.md)
RECIPE_KEYS = ("adv_start_epoch", "adv_lr", "adv_perceptual_weight", "disc_warmup_steps")  # preset keys passed as they are
RULE_NAMES = {"shape": "digit shape", "bottleneck": "bottleneck features", "image": "image re-encoded",
              "pixel_nn_baseline": "pixel baseline"}
PRESETS = {
    # The first command: minutes on a 2-core CPU even on a slow day (measured in README). It continues the shipped
    # student on pairs of a seed it never saw (8: it trained on seeds 0-2 and 11-14), with its last leg's losses
    # (adversarial share 2.0, class 0.05, no perceptual term) at that leg's lr and its discriminator, so its
    # evaluation is held out and its pictures are the shipped student's quality. Its pairs come from the teacher
    # sampler (K, spacing) the shipped student learned, read from its checkpoint.
    "demo": {"n_pairs": 1200, "pairs_seed": 8, "init_from": DEFAULT_STUDENT,
             "gen_batch": 250, "gen_channels_last": True, "epochs": 3, "train_batch": 32, "lr": 1e-4,
             "val_fraction": 0.2, "perceptual_weight": 0.0, "class_weight": 0.05, "adv_weight": 2.0,
             "encoder_steps": 200, "encoder_pool_size": 2048, "feature_batch": 500, "n_attr": 36, "n_eval": 256},
    # From the teacher alone, the recipe that made the shipped student in one run (README "Bring your own teacher"):
    # regression with the perceptual term, then the adversarial phase (adversarial and class terms, no perceptual
    # term) at a lower learning rate, after the discriminator's warm-up. Pairs from DDIM K = 25 leading, the sampler
    # the shipped student learned. CPU minutes: 2,000 pairs; a short, strong adversarial phase (share 4.0 for 4
    # epochs), whose best epoch is selected by val FD: measured 1.96x the teacher's audit FD on unseen pairs, where
    # share 2.0 for 14 epochs gave 2.40x at twice the time (BENCHMARKS "From a teacher in one command").
    "demo_from_teacher": {"n_pairs": 2000, "ddim_steps": 25, "ddim_spacing": "leading", "gen_batch": 250,
                          "gen_channels_last": True, "epochs": 10, "adv_start_epoch": 6, "train_batch": 32,
                          "lr": 1e-3, "adv_lr": 3e-4, "perceptual_weight": 0.05, "adv_perceptual_weight": 0.0,
                          "adv_weight": 4.0, "class_weight": 0.05, "disc_warmup_steps": 50,
                          "encoder_steps": 200, "encoder_pool_size": 2048, "feature_batch": 500, "n_attr": 36,
                          "n_eval": 256},
    # The same recipe at the scale a 2-core CPU runs overnight: 12,000 pairs (of seed 21, which no shipped model
    # trained on), 10 epochs of regression and 40 adversarial ones at the shipped legs' steadier share 2.0 (share 4.0
    # peaks early and oscillates over long phases).
    "overnight": {"n_pairs": 12000, "pairs_seed": 21, "ddim_steps": 25, "ddim_spacing": "leading", "gen_batch": 100,
                  "gen_channels_last": True, "epochs": 50, "adv_start_epoch": 10, "train_batch": 64, "lr": 1e-3,
                  "adv_lr": 1e-4, "perceptual_weight": 0.05, "adv_perceptual_weight": 0.0, "adv_weight": 2.0,
                  "class_weight": 0.05, "disc_warmup_steps": 200, "encoder_steps": 1500, "feature_batch": 500,
                  "n_attr": 36, "n_eval": 500},
    # The production run for a GPU (runs under torchrun): 60,000 pairs.
    "full": {"n_pairs": 60000, "ddim_steps": 25, "ddim_spacing": "leading", "gen_batch": 1000, "epochs": 30,
             "adv_start_epoch": 10, "train_batch": 64, "lr": 1e-3, "adv_lr": 1e-4, "perceptual_weight": 0.05,
             "adv_perceptual_weight": 0.0, "adv_weight": 2.0, "class_weight": 0.05, "disc_warmup_steps": 500,
             "val_fraction": 0.02, "encoder_steps": 3000, "feature_batch": 1000, "n_attr": 36, "n_eval": 1000},
}


def run_pipeline(preset: str, output_dir: str, teacher: str, cpu: bool = False, dry_run: bool = False,
                 classifier: str = DEFAULT_CLASSIFIER) -> dict:
    p = PRESETS[preset]
    out = Path(output_dir)
    sampler = _init_from_sampler(p["init_from"], teacher, preset) if p.get("init_from") else \
        SamplerConfig(steps=p["ddim_steps"], spacing=p.get("ddim_spacing"))
    gen = GenerateOptions(ckpt=teacher, n_samples=p["n_pairs"], batch_size=p["gen_batch"], seed=p.get("pairs_seed", 0),
                          output_dir=str(out / "data"), sampler=sampler.name, steps=sampler.steps,
                          spacing=sampler.spacing, eta=sampler.eta, clip_x0=sampler.clip_x0,
                          channels_last=p.get("gen_channels_last", False), cpu=cpu)
    train = StudentTrainOptions(ddpm_ckpt=teacher, data_path=str(out / "data" / "training_data.pt"),
                                output_dir=str(out / "student"), epochs=p["epochs"], batch_size=p["train_batch"],
                                lr=p["lr"], perceptual_weight=p["perceptual_weight"], classifier=classifier,
                                class_weight=p.get("class_weight", 0.0), adv_weight=p.get("adv_weight", 0.0),
                                **{k: p[k] for k in RECIPE_KEYS if k in p},
                                val_fraction=p.get("val_fraction", 0.1), init_from=p.get("init_from", ""), cpu=cpu)
    feats = preset_feature_options(p, teacher, str(out / "student" / "best_model.pt"), str(out / "reference_features.pt"),
                                   cpu)
    attr = AttributionOptions(ddpm_ckpt=teacher, decoder_ckpt=feats.decoder_ckpt, ref_features_path=feats.output_path,
                              n_samples=p["n_attr"], output_dir=str(out / "attribution"), n_eval=p["n_eval"],
                              strength=[0.5, CLASS_PANEL_STRENGTH], classifier=classifier, cpu=cpu)
    stages = [("generate", lambda: generate_training_data(gen), out / "data" / "training_data.pt"),
              ("train", lambda: train_student(train, resume=True), out / "student" / "evaluation.json"),
              ("extract", lambda: extract_reference_features(feats), out / "reference_features.pt"),
              ("attribute", lambda: attribution_generation(attr), out / "attribution" / "attribution_report.json")]
    # Under torchrun generation and training use every rank; features, attribution and bookkeeping run on rank 0.
    ranks, _ = start_ranks(pick_device(cpu))
    say = print if ranks.is_main else (lambda *args: None)
    if dry_run:
        plan = {"preset": preset, "settings": p, "teacher": teacher, "teacher_sampler": sampler.to_dict(),
                "recipe": [phase.to_dict() for phase in training_phases(train)], "output_dir": str(out),
                "stages": [s[0] for s in stages]}
        say(json.dumps(plan, indent=2))
        return plan
    with naming_rank(ranks):
        ranks.main_only(lambda: prepare_output_dir(out) and None)
        state_path = out / "pipeline_state.json"
        state = json.loads(state_path.read_text()) if state_path.exists() else {"preset": preset, "stages": {}}
        for name, call, product in stages:
            if ranks.broadcast(name in state["stages"] and product.exists()):
                if ranks.is_main:
                    print(f"[{name}] done earlier ({state['stages'][name]['wall_s']:.0f}s); skipping")
                continue
            say(f"[{name}] starting")
            start = time.perf_counter()
            if name in ("generate", "train"):
                call()
            else:
                ranks.main_only(lambda: call() and None)
            state["stages"][name] = {"wall_s": time.perf_counter() - start}
            ranks.main_only(lambda: atomic_write_json(state, state_path))
        total = sum(s["wall_s"] for s in state["stages"].values())
        ranks.main_only(lambda: write_report(out, preset, p, teacher, state))
    say(f"run_pipeline: preset {preset} finished; stages took {total:.0f}s in all; report {out / 'report.md'}")
    return state


def preset_feature_options(p: dict, teacher: str, student: str, output_path: str, cpu: bool) -> FeatureOptions:
    """A preset's extraction settings (also what serve.py uses to build a pair's features once)."""
    return FeatureOptions(ddpm_ckpt=teacher, decoder_ckpt=student, batch_size=p["feature_batch"],
                          output_path=output_path, encoder_steps=p["encoder_steps"],
                          encoder_pool_size=p.get("encoder_pool_size", FeatureOptions.encoder_pool_size), cpu=cpu)


def _init_from_sampler(student_ckpt: str, teacher: str, preset: str) -> SamplerConfig:
    """A preset that continues the shipped student needs the shipped teacher (said before any work), and pairs from
    the teacher sampler that student learned."""
    ckpt = load_checkpoint(student_ckpt, "cpu", what="student checkpoint", mmap=True)
    if ckpt.get("teacher", {}).get("sha256") != sha256_file(teacher):
        raise PipelineError(f"--preset {preset} continues {student_ckpt}, which was distilled from another teacher "
                            f"than {teacher}; use --preset demo_from_teacher, which distils a new student from yours")
    return SamplerConfig.from_student(ckpt)


def _load_features_metadata(path: Path) -> dict:
    if not path.exists():
        return {}
    return load_checkpoint(path, "cpu", what="reference features", mmap=True)["metadata"]


def _load_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _student_origin(settings: dict) -> list[str]:
    if not settings.get("init_from"):
        start = settings.get("adv_start_epoch", 0)
        recipe = (f"{start} epochs of regression, then {settings['epochs'] - start} with the adversarial term"
                  if settings.get("adv_weight") and start else f"{settings['epochs']} epochs")
        return ["", f"The student was distilled from the teacher here: {recipe}, on these {settings['n_pairs']} "
                    "pairs."]
    return ["", f"The student continues `{settings['init_from']}` (distilled earlier from this teacher) for "
                f"{settings['epochs']} epochs on these {settings['n_pairs']} pairs, of seed {settings['pairs_seed']}, "
                f"which it had never seen: its validation pairs are held out. `--preset demo_from_teacher` distils "
                f"one from the teacher alone instead."]


def _audit_rows(ev: dict) -> list[str]:
    """The same scores from the audit classifier, which the perceptual term never trained against."""
    if "audit" not in ev:
        return []
    a = ev["audit"]
    fd = a["frechet_distance"]
    return [f"| audit classifier: class agreement | {a['class_agreement_student_teacher']:.1%} |",
            f"| audit classifier: Frechet distance student / teacher / real-vs-real | {fd['student_vs_real']:.2f} / "
            f"{fd['teacher_vs_real']:.2f} / {fd['real_half_vs_real_half']:.2f} |"]


def write_report(out: Path, preset: str, settings: dict, teacher: str, state: dict) -> None:
    ev = _load_json(out / "student" / "evaluation.json")
    attr = _load_json(out / "attribution" / "attribution_report.json")
    hooks_png = ["samples_baseline.png", "samples_include.png", "samples_exclude.png",
                 f"samples_class_3_s{CLASS_PANEL_STRENGTH}.png"]
    epochs = settings["epochs"]
    lines = [f"# Direct Decoder pipeline report ({preset})", "",
             f"Teacher `{teacher}`; settings `{json.dumps(settings)}`; {software_versions()['platform']}, "
             f"torch {software_versions()['torch']}.", "", "## Wall time", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {state['stages'][k]['wall_s']:.1f} |" for k in STAGES if k in state["stages"]]
    lines += [f"| **total** | **{sum(v['wall_s'] for v in state['stages'].values()):.1f}** |", ""]
    lines += ["## Student vs teacher", "",
              "Top row: the teacher's DDIM image; bottom row: the student's one-step image for the same noise "
              "(held-out validation pairs).", *_student_origin(settings), "",
              f"![student vs teacher](student/samples_epoch_{epochs:03d}.png)", "",
              "![loss](student/loss.png)", ""]
    if ev:
        fd = ev["frechet_distance"]
        sp = ev["speed"]
        lines += ["| metric | value |", "|---|---|",
                  f"| validation MSE to teacher | {ev['val_mse_to_teacher']:.4f} |",
                  f"| class agreement student/teacher | {ev['class_agreement_student_teacher']:.1%} |",
                  f"| Frechet distance student / teacher / real-vs-real | {fd['student_vs_real']:.2f} / "
                  f"{fd['teacher_vs_real']:.2f} / {fd['real_half_vs_real_half']:.2f} |",
                  *_audit_rows(ev),
                  f"| student images/s (batch {sp['batch_size']}) | {sp['student_images_per_s']:.0f} |",
                  f"| teacher UNet evaluations/s | {sp['teacher_unet_evals_per_s']:.0f} |", ""]
    features_meta = _load_features_metadata(out / "reference_features.pt")
    if features_meta:
        c = features_meta["consistency"]
        lines += ["## Reference features", "",
                  f"{features_meta['n']} {features_meta['dataset']} images by `{features_meta['method']}` "
                  f"({features_meta['method_description']}).", "", "| metric | value |", "|---|---|",
                  f"| consistency (a): cosine between the student's bottleneck for its own generations and what "
                  f"extraction recovers from those images | {c['generated_bottleneck_cosine_mean']:.3f} |",
                  f"| reconstruction PSNR of the training images decoded from their features | "
                  f"{c['reconstruction_psnr_db_mean']:.1f} dB |",
                  f"| extraction wall time (encoder training + features) | "
                  f"{features_meta['encoder_training_wall_s'] + features_meta['extraction_wall_s']:.0f} s |", ""]
    lines += ["## Hooks", "", "Same noise for every panel: baseline, include (toward samples 0-9), exclude (away from "
              f"samples 100-109), at strength 0.5; class 3 at {CLASS_PANEL_STRENGTH}, where the default hook style "
              "reaches the class (BENCHMARKS.md, Hooks).", ""]
    lines += [f"![{p}](attribution/{p})" for p in hooks_png] + [""]
    if attr:
        lines += ["| strength | class-3 success | (audit classifier) | similarity to include set | "
                  "similarity to exclude set |", "|---|---|---|---|---|",
                  f"| 0 (baseline) | {attr['baseline_share_target_class']:.1%} | | "
                  f"{attr['baseline_include_similarity']:.3f} | {attr['baseline_exclude_similarity']:.3f} |"]
        lines += [f"| {s} | {c:.1%} | {ca:.1%} | {i:.3f} | {e:.3f} |" for s, c, ca, i, e in
                  zip(attr["strengths"], attr["class_hook_success"], attr["class_hook_success_audit"],
                      attr["include_similarity"], attr["exclude_similarity"])]
        a = attr["attribution_label_agreement_audit"]
        rules = "; ".join(f"{RULE_NAMES[k]} top-1 {v['top1']:.1%}" for k, v in a.items())
        lines += ["", f"Attribution label agreement (the audit classifier's label of a generation vs its nearest "
                      f"training image's label): {rules}.", ""]
    rule = RULE_NAMES.get((attr or {}).get("attribute_by"), "the features' default rule")
    lines += ["## Attribution", "", f"Each generation beside its most similar training images by {rule} (label y, "
              "similarity, and pN: its percentile among the training images' similarity to their own nearest "
              "neighbour; near 100 is a near-copy). Similarity is not causal influence.", "",
              "![attribution grid](attribution/attribution_grid.png)", ""]
    atomic_write_text("\n".join(lines), out / "report.md")
