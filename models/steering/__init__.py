"""Steering through the student's bottleneck: hooks, the nearest-training-image search, and Steering."""
