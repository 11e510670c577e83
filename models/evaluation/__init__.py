"""Measuring the models: image-quality metrics, student/teacher evaluation, steering evaluation, figures, and the
benches' shared setup."""
