"""What the image encoder's training costs, per part, in CPU seconds of one thread (process time, so another job on
the machine barely moves it): the student generating an (image, bottleneck) pair, the encoder's training step on one
image with 0, 1 or 2 leading blocks frozen, and the frozen stem's forward pass. From those, the cost of a training
configuration relative to fresh generations every step (the earlier default), as ratios measured in one run.

    python bench/bench_encoder_cost.py --ddpm_ckpt T --decoder_ckpt S --steps 1500 --pool_size 8192
"""

import torch
import torch.nn.functional as F

from models.diffusion.noise import per_sample_noise
from models.evaluation.bench_common import cpu_seconds
from models.io.cli import ArgumentParser
from models.io.errors import run_cli
from models.io.paths import DEFAULT_STUDENT, DEFAULT_TEACHER
from models.io.records import append_run_record
from models.nets.image_encoder import ImageEncoder
from models.nets.student import load_teacher_and_student
from models.training.image_encoder import POOL_BATCH


def main():
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ddpm_ckpt", default=DEFAULT_TEACHER, help="teacher checkpoint")
    p.add_argument("--decoder_ckpt", default=DEFAULT_STUDENT, help="direct-decoder checkpoint")
    p.add_argument("--batch_size", type=int, default=64, help="encoder training batch")
    p.add_argument("--steps", type=int, default=1500, help="encoder training steps of the configurations compared")
    p.add_argument("--pool_size", type=int, default=8192, help="pool size of the pooled configurations")
    p.add_argument("--repeats", type=int, default=4, help="timed repeats per part (the fastest counts)")
    p.add_argument("--record", default="bench/results/encoder_cost.jsonl", help="append results here")
    a = p.parse_args()
    torch.set_num_threads(1)
    teacher, student = load_teacher_and_student(a.ddpm_ckpt, a.decoder_ckpt, torch.device("cpu"))
    z = per_sample_noise(0, range(POOL_BATCH), stream=11)
    with torch.inference_mode():
        images, h, _ = student.decoder.generate(z)
    images, h = images[:a.batch_size].clone(), h[:a.batch_size].clone()

    def generate():
        with torch.inference_mode():
            student.decoder.generate(z)
    per_image = {"generate": cpu_seconds(generate, a.repeats) / POOL_BATCH}
    for frozen in (0, 1, 2):
        encoder = ImageEncoder.from_teacher(teacher.diffusion.model, teacher.config)
        encoder.freeze_stem(frozen)
        encoder.train()
        with torch.no_grad():
            inputs = encoder.stem(images, frozen) if frozen else images
        predict = (lambda x: encoder.head(x, frozen)) if frozen else encoder
        optimizer = torch.optim.AdamW([q for q in encoder.parameters() if q.requires_grad], lr=1e-3)

        def step():
            loss = F.mse_loss(predict(inputs), h)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        per_image[f"train_frozen_{frozen}"] = cpu_seconds(step, a.repeats) / a.batch_size
        if frozen:
            with torch.no_grad():
                per_image[f"stem_{frozen}"] = cpu_seconds(lambda: encoder.stem(images, frozen), a.repeats) / a.batch_size
    draws = a.steps * a.batch_size
    costs = {"fresh (every step's images generated)": draws * (per_image["generate"] + per_image["train_frozen_0"]),
             f"pool {a.pool_size}": a.pool_size * per_image["generate"] + draws * per_image["train_frozen_0"]}
    for frozen in (1, 2):
        costs[f"pool {a.pool_size}, frozen {frozen}"] = a.pool_size * (per_image["generate"] + per_image[f"stem_{frozen}"]) \
            + draws * per_image[f"train_frozen_{frozen}"]
    base = costs["fresh (every step's images generated)"]
    print(f"per image, CPU ms of one thread: " + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in per_image.items()))
    for name, cost in costs.items():
        print(f"{a.steps} steps x {a.batch_size}, {name}: {cost:.0f} CPU s, {cost / base:.2f}x fresh")
    append_run_record({"bench": "encoder_cost", "steps": a.steps, "batch_size": a.batch_size, "pool_size": a.pool_size,
                       "per_image_cpu_s": per_image, "cpu_s": costs,
                       "ratio_to_fresh": {k: v / base for k, v in costs.items()},
                       "teacher_sha256": teacher.sha256, "student_sha256": student.sha256}, a.record)


if __name__ == "__main__":
    run_cli(main, resumable=False)
