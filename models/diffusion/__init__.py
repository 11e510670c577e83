"""Sampling the teacher: the noise schedule, the samplers (plain functions of an epsilon predictor), SamplerConfig,
and per-sample noise."""
