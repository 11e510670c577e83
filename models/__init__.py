"""Distil an MNIST DDPM teacher into a one-step direct decoder, steer it at its bottleneck, and attribute what it
draws to training images. The public API is re-exported here; the design, one file per job, is in models/README.md:

    io/          files, checkpoints, paths, errors, command lines (no model code)
    data/        datasets and the teacher's training pairs
    nets/        the networks: UNet, teacher, student, classifier, image encoder, discriminator
    diffusion/   noise schedule, samplers, SamplerConfig, per-sample noise
    training/    the training loops (teacher, student, adversarial term, image encoder)
    steering/    hooks (bottleneck and finer layers), nearest-training-image search, Steering
    stages/      one module per pipeline stage (the top-level scripts' work)
    evaluation/  metrics, evaluations, figures, the benches' shared setup
    server/      serve.py's HTTP API, jobs and steering page
    api.py       DirectDecoderPipeline: one import for notebooks

Modules inside the package import from each other's modules, never from this file.
"""
from .api import DirectDecoderPipeline
from .diffusion.noise import per_sample_noise
from .diffusion.sampling import SamplerConfig
from .io.errors import PipelineError
from .nets.student import load_teacher_and_student
from .steering.hooks import (Hook, at_layer, channel_scale_hook, class_hook, compose, exclude_hook, include_hook,
                             interpolate_hook, multi_include_hook)

__all__ = [
    "DirectDecoderPipeline", "Hook", "PipelineError", "SamplerConfig", "at_layer", "channel_scale_hook", "class_hook",
    "compose", "exclude_hook", "include_hook", "interpolate_hook", "load_teacher_and_student", "multi_include_hook",
    "per_sample_noise",
]
