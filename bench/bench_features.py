"""Reference-feature extraction methods side by side on one teacher/student pair: consistency (a) (does extraction
recover the student's own bottleneck for images it generated?), reconstruction PSNR of the training images, and
wall time; plus how well DDIM inversion recovers the teacher's *own* latents (the ceiling of that method).

    python bench/bench_features.py --ddpm_ckpt T --decoder_ckpt S --limit 5000 --inversion_steps 10 25
"""
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.diffusion.noise import per_sample_noise
from models.diffusion.samplers import ddim_invert, inversion_timesteps
from models.diffusion.sampling import teacher_sample
from models.io.cli import ArgumentParser, add_cpu_flag
from models.io.device import pick_device
from models.io.errors import run_cli
from models.io.records import append_run_record
from models.io.teacher_checkpoints import load_teacher
from models.nets.student import load_student
from models.stages.features import FeatureOptions, extract_reference_features, latent_timestep


@torch.inference_mode()
def teacher_round_trip(teacher, start_t: int, gen_steps: int, spacing: str, inv_steps: int, n: int, device):
    """z -> teacher DDIM image -> DDIM inversion -> z': cosine(z, z') and the image error of z' decoded again."""
    d = teacher.diffusion
    z = per_sample_noise(4242, range(n), device=device)
    x = teacher_sample(d, z, "ddim", gen_steps, spacing=spacing)
    z_back = ddim_invert(d.predict_noise, x, d.alphas_cumprod, inv_steps,
                         timesteps=inversion_timesteps(start_t, inv_steps))
    x_back = teacher_sample(d, z_back, "ddim", gen_steps, spacing=spacing)
    return {"latent_cosine_mean": F.cosine_similarity(z.flatten(1), z_back.flatten(1)).mean().item(),
            "image_mse_after_round_trip": torch.mean((x_back - x) ** 2).item()}


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", required=True, help="teacher checkpoint")
    p.add_argument("--decoder_ckpt", required=True, help="direct-decoder checkpoint (trained with --skips zero)")
    p.add_argument("--limit", type=int, default=5000, help="training images to extract")
    p.add_argument("--inversion_steps", type=int, nargs="+", default=[10], help="DDIM inversion steps to compare")
    p.add_argument("--encoder_steps", type=int, default=600, help="image-encoder training steps")
    p.add_argument("--batch_size", type=int, default=500, help="images per batch")
    p.add_argument("--round_trip_n", type=int, default=128, help="latents for the teacher round trip")
    p.add_argument("--record", default="bench/results/features.jsonl", help="append results here")
    add_cpu_flag(p)
    a = p.parse_args()
    device = pick_device(a.cpu)
    teacher, student = load_teacher(a.ddpm_ckpt, device), load_student(a.decoder_ckpt, device)
    meta = student.checkpoint["training_data"]["metadata"]
    start_t = latent_timestep(student.checkpoint, teacher.config.timesteps)
    runs = [("image_encoder", {"encoder_steps": a.encoder_steps})] + \
        [("ddim_inversion", {"inversion_steps": k}) for k in a.inversion_steps]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, extra in runs:
            out = Path(tmp) / f"{method}_{extra}.pt".replace(" ", "")
            start = time.perf_counter()
            result = extract_reference_features(FeatureOptions(
                ddpm_ckpt=a.ddpm_ckpt, decoder_ckpt=a.decoder_ckpt, output_path=str(out), limit=a.limit,
                method=method, batch_size=a.batch_size, cpu=a.cpu, **extra))
            wall = time.perf_counter() - start
            row = {"method": method, **extra, "n": result["n"], "wall_s": round(wall, 1),
                   "encoder_training_s": result["metadata"]["encoder_training_wall_s"],
                   "extraction_s": result["metadata"]["extraction_wall_s"], **result["metadata"]["consistency"]}
            if method == "ddim_inversion":
                row["teacher_round_trip"] = teacher_round_trip(teacher, start_t, int(meta["steps"]),
                                                               meta["spacing"], extra["inversion_steps"],
                                                               a.round_trip_n, device)
            rows.append(row)
            append_run_record(row | {"teacher_sha256": teacher.sha256, "student_sha256": student.sha256}, a.record)
    print(f"{'method':<28}{'consistency cos':>16}{'recon PSNR dB':>14}{'wall s':>8}{'teacher latent cos':>20}")
    for r in rows:
        name = r["method"] + (f" K={r['inversion_steps']}" if "inversion_steps" in r else
                              f" {r['encoder_steps']} steps")
        rt = r.get("teacher_round_trip", {}).get("latent_cosine_mean")
        print(f"{name:<28}{r['generated_bottleneck_cosine_mean']:>16.3f}{r['reconstruction_psnr_db_mean']:>14.1f}"
              f"{r['wall_s']:>8.0f}{'' if rt is None else f'{rt:.3f}':>20}")


if __name__ == "__main__":
    run_cli(main, resumable=False)
