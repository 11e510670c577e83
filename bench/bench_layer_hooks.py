"""What does a hook at each decoder layer control? Hooks at the bottleneck (7x7) and the decoder's finer layers (up1
14x14, up2 28x28), on one held-out noise seed, judged by the AUDIT classifier (no hook, loss or rule uses it):

- per layer and strength, a class hook toward a digit and an include hook toward 10 training images of that digit
  (by default the 10 with the thickest strokes, so a change of style shows): the share of generations the audit
  classifier gives the digit, the similarity (cosine of audit features) to the target set's mean (all training
  images of the digit for the class hook, the 10 for include; beside it, to all the digit's images, and for the
  include targets the style similarity: the cosine of a generation's feature minus the digit's mean feature with
  the targets' mean minus the digit's mean, i.e. like those 10 rather than like any image of the digit), k-NN precision
  (k = 3) against all real digits (do the images stay digits?), and two style measures from the images' moments:
  stroke thickness (2 x ink area / ink boundary length, in pixels) and slant (-mu11 / mu02: x shift per pixel of
  height, > 0 leaning right); beside them the unhooked generations and the targets' own values;
- composed: the class hook at the bottleneck at --class_strength together with the include hook at each layer, by
  strength of the include: does the class share stay >= 95% while similarity to the 10 rises?
- the reference features' cost at each layer: derived from the bottleneck features (CPU s) against stored (MiB).

Writes picture strips (one PNG per layer, and the composed one) to --figures_dir.

    python bench/bench_layer_hooks.py --ddpm_ckpt checkpoints/teacher_mnist5k.pt \
        --decoder_ckpt checkpoints/student_mnist5k.pt --ref_features_path FEATURES.pt --n 500 --cpu
"""
import time

import torch
import torch.nn.functional as F

from models.data.datasets import load_dataset
from models.evaluation.bench_common import cpu_seconds, load_pipeline, mean_similarity, pipeline_parser
from models.evaluation.metrics import classifier_outputs, knn_precision_recall
from models.io.errors import PipelineError, run_cli
from models.io.files import prepare_output_dir
from models.io.images import save_image_grid
from models.io.paths import AUDIT_CLASSIFIER
from models.io.progress import progress_bar
from models.io.records import append_run_record
from models.nets.classifier import load_classifier
from models.steering.hooks import BOTTLENECK, compose
from models.steering.layer_features import derive_layer_features


def stroke_thickness(images: torch.Tensor) -> torch.Tensor:
    """Per image: 2 x ink area / ink boundary length (ink: intensity above half). A stroke of width w and length L
    has area wL and boundary about 2L, so this is w in pixels."""
    ink = F.pad((images[:, 0] > 0).float(), (1, 1, 1, 1))
    boundary = (ink[:, 1:] - ink[:, :-1]).abs().sum((1, 2)) + (ink[:, :, 1:] - ink[:, :, :-1]).abs().sum((1, 2))
    return 2 * ink.sum((1, 2)) / boundary.clamp_min(1)


def slant(images: torch.Tensor) -> torch.Tensor:
    """Per image: -mu11 / mu02 of the intensity (y grows downward): how far the digit's x moves per pixel up."""
    p = ((images[:, 0].float() + 1) / 2).clamp(0, 1)
    side = p.shape[-1]
    y, x = torch.meshgrid(torch.arange(side, dtype=p.dtype), torch.arange(side, dtype=p.dtype), indexing="ij")
    mass = p.sum((1, 2)).clamp_min(1e-6)
    cx, cy = (p * x).sum((1, 2)) / mass, (p * y).sum((1, 2)) / mass
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    return -(p * dx * dy).sum((1, 2)) / (p * dy * dy).sum((1, 2)).clamp_min(1e-6)


class Judge:
    """The audit classifier's verdict on a set of generations, against the digit's real images and a target set."""

    def __init__(self, audit, digit: int, real_feats: torch.Tensor, class_feats: torch.Tensor):
        self.audit, self.digit, self.real_feats, self.class_feats = audit, digit, real_feats, class_feats

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> dict:
        feats, logits = classifier_outputs(self.audit, images)
        verdict = {"share": (logits.argmax(1) == self.digit).float().mean().item(),
                   "similarity": mean_similarity(feats, targets),
                   "similarity_to_class": mean_similarity(feats, self.class_feats),
                   "precision": knn_precision_recall(self.real_feats, feats)[0],
                   "thickness": stroke_thickness(images).mean().item(), "slant": slant(images).mean().item()}
        if targets is not self.class_feats:  # what sets the targets apart from their class: are generations so?
            centre = self.class_feats.mean(0)
            verdict["style_similarity"] = F.cosine_similarity(feats - centre, (targets.mean(0) - centre)[None],
                                                              dim=1).mean().item()
        return verdict


def cost_of_layers(decoder, features: torch.Tensor) -> dict:
    """Deriving each finer layer's reference features from the bottleneck (one core's CPU seconds, from the
    bottleneck alone) against their size if stored (float32 MiB)."""
    out = {BOTTLENECK: {"stored_mib": features[0].numel() * 4 * len(features) / 2 ** 20}}
    for layer in decoder.hook_layers[1:]:
        seconds = cpu_seconds(lambda: derive_layer_features(decoder, features, [layer]))
        out[layer] = {"derive_cpu_s": round(seconds, 2),
                      "stored_mib": torch.Size(decoder.layer_shape(layer)).numel() * 4 * len(features) / 2 ** 20}
    return out


@torch.inference_mode()
def main():
    p = pipeline_parser(__doc__, "bench/results/layer_hooks.jsonl", n=500)
    p.add_argument("--seed", type=int, default=2, help="noise seed (held out: figures use 0, the stage's evaluation 1)")
    p.add_argument("--audit_classifier", default=AUDIT_CLASSIFIER, help="the judge (no hook or loss uses it)")
    p.add_argument("--digit", type=int, default=3, help="class of the class hook and of the include targets")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0], help="hook strengths")
    p.add_argument("--class_strength", type=float, default=0.75,
                   help="strength of the bottleneck class hook in the composed setting (where the class hook reaches "
                        "its digit: BENCHMARKS.md, Hooks)")
    p.add_argument("--targets", type=int, nargs="+", default=None,
                   help="training images to include (default: the --n_targets of --digit with the thickest strokes)")
    p.add_argument("--n_targets", type=int, default=10, help="include targets chosen when --targets is not given")
    p.add_argument("--figures_dir", default="docs/figures", help="picture strips: layer_hooks_<layer>.png, "
                   "layer_hooks_composed.png ('' for none)")
    p.add_argument("--figure_rows", type=int, default=6, help="noises (rows) per picture strip")
    a = p.parse_args()
    start = time.perf_counter()
    pipe, _ = load_pipeline(a)
    audit = load_classifier(a.audit_classifier, pipe.device)
    steer, decoder = pipe.steering, pipe.student.decoder
    if a.digit not in steer.labels.tolist():
        raise PipelineError(f"--digit {a.digit} is not a label of the reference set")
    meta = pipe.reference["metadata"]
    dataset = load_dataset(meta["dataset"], meta.get("split", "train"))
    rows = pipe.reference["indices"].cpu()
    real_images = dataset.images[rows]
    of_digit = torch.nonzero(steer.labels == a.digit).flatten()
    if a.targets is None:
        a.targets = of_digit[stroke_thickness(real_images[of_digit]).argsort(descending=True)[:a.n_targets]].tolist()
    real_feats, _ = classifier_outputs(audit, real_images)
    class_targets, include_targets = real_feats[of_digit], real_feats[a.targets]
    judge = Judge(audit, a.digit, real_feats, class_targets)
    costs = cost_of_layers(decoder, steer.layer_features(BOTTLENECK))

    noise = pipe.noise(a.n, a.seed)
    h = decoder.bottleneck(noise)
    at_layer = {layer: decoder.layer_features(h, layer) for layer in steer.hook_layers}  # one decoder pass per layer

    def images_of(hook, layer):
        return decoder.decode(at_layer[layer], hook, layer=layer).float().clamp(-1, 1)

    def style_of(images):
        return {"thickness": stroke_thickness(images).mean().item(), "slant": slant(images).mean().item()}

    base = images_of(None, BOTTLENECK)
    result = {"n": a.n, "seed": a.seed, "judge": a.audit_classifier, "digit": a.digit, "targets": a.targets,
              "class_strength": a.class_strength, "decoder": a.decoder_ckpt, "features": a.ref_features_path,
              "layer_cost": costs,
              "reference": {"class": style_of(real_images[of_digit]), "targets": style_of(real_images[a.targets])},
              "unhooked": {"class": judge(base, class_targets), "include": judge(base, include_targets)},
              "layers": {}, "composed": {}}
    bar = progress_bar(total=len(steer.hook_layers) * len(a.strengths) * 3, desc="layer hooks", unit="setting")
    class_hook = steer.toward_class(a.digit, a.class_strength)
    for layer in steer.hook_layers:
        table = {"class": {}, "include": {}}
        for s in a.strengths:
            table["class"][s] = judge(images_of(steer.toward_class(a.digit, s, layer=layer), layer), class_targets)
            table["include"][s] = judge(images_of(steer.include(a.targets, s, layer=layer), layer), include_targets)
            composed = compose(class_hook, steer.include(a.targets, s, layer=layer))
            result["composed"].setdefault(layer, {})[s] = judge(images_of(composed, BOTTLENECK), include_targets)
            bar.update(3)
        result["layers"][layer] = table
    bar.close()
    result["composed_class_only"] = judge(images_of(class_hook, BOTTLENECK), include_targets)
    if a.figures_dir:
        result["figures"] = write_strips(a, pipe, real_images, class_hook)
    result["seconds"] = round(time.perf_counter() - start, 1)
    append_run_record(result, a.record)
    print_tables(result)
    print(f"bench_layer_hooks: {len(steer.hook_layers)} layers x {len(a.strengths)} strengths x (class, include, "
          f"composed), {a.n} generations each, in {result['seconds']}s -> {a.record}")


def write_strips(a, pipe, real_images, class_hook) -> list[str]:
    """Per layer: rows of noises (seed 0), columns the unhooked image, the class hook at each strength, then the
    include hook at each strength. Composed: unhooked, the class hook at the bottleneck, then with the include hook
    at each layer by strength. The include targets: layer_hooks_targets.png."""
    out = prepare_output_dir(a.figures_dir)
    steer, decoder = pipe.steering, pipe.student.decoder
    noise = pipe.noise(a.figure_rows, 0)
    base = decoder(noise)
    written = []
    for layer in steer.hook_layers:
        columns = [base] + [decoder(noise, steer.toward_class(a.digit, s, layer=layer)) for s in a.strengths] + \
                  [decoder(noise, steer.include(a.targets, s, layer=layer)) for s in a.strengths]
        written.append(out / f"layer_hooks_{layer}.png")
        save_image_grid(_interleave(columns), written[-1], nrow=len(columns))
    columns = [base, decoder(noise, class_hook)]
    for layer in steer.hook_layers:
        columns += [decoder(noise, compose(class_hook, steer.include(a.targets, s, layer=layer))) for s in a.strengths]
    written.append(out / "layer_hooks_composed.png")
    save_image_grid(_interleave(columns), written[-1], nrow=len(columns))
    written.append(out / "layer_hooks_targets.png")
    save_image_grid(real_images[a.targets], written[-1], nrow=len(a.targets))
    return [str(path) for path in written]


def _interleave(columns: list[torch.Tensor]) -> torch.Tensor:
    """Columns of images [rows, 1, H, W] -> one tensor in row-major order for a grid of len(columns) per row."""
    return torch.stack([c.float().clamp(-1, 1) for c in columns], dim=1).flatten(0, 1)


def _row(v: dict) -> str:
    style = f"  style sim {v['style_similarity']:+.3f}" if "style_similarity" in v else ""
    return (f"share {v['share']:6.1%}  sim {v['similarity']:.3f} (class {v['similarity_to_class']:.3f}){style}  "
            f"P {v['precision']:.2f}  thick {v['thickness']:.2f}  slant {v['slant']:+.3f}")


def print_tables(r: dict) -> None:
    print(f"layer cost: {r['layer_cost']}")
    print(f"reference: {r['reference']}")
    for kind in ("class", "include"):
        print(f"{kind} hook, unhooked: {_row(r['unhooked'][kind])}")
        for layer, table in r["layers"].items():
            for s, v in table[kind].items():
                print(f"  {layer:10s} {s:4}  {_row(v)}")
    print(f"composed: class {r['digit']} at the bottleneck {r['class_strength']} alone: "
          f"{_row(r['composed_class_only'])}")
    for layer, table in r["composed"].items():
        for s, v in table.items():
            print(f"  + include at {layer:10s} {s:4}  {_row(v)}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
