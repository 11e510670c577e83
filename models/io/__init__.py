"""Files, checkpoints, paths, errors and command lines: what every stage shares (no model code)."""
