"""The repository root and the checkpoints it ships (the defaults of every stage)."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Shipped assets, found from any working directory.
DEFAULT_TEACHER = str(REPO_ROOT / "checkpoints" / "teacher_mnist5k.pt")
DEFAULT_STUDENT = str(REPO_ROOT / "checkpoints" / "student_mnist5k.pt")  # distilled from DEFAULT_TEACHER
DEFAULT_CLASSIFIER = str(REPO_ROOT / "checkpoints" / "classifier_mnist5k.pt")
# Another architecture, seed and split, used only to score: no loss ever sees it, so a student trained with the
# perceptual term (in DEFAULT_CLASSIFIER's feature space) cannot have learnt to please it.
AUDIT_CLASSIFIER = str(REPO_ROOT / "checkpoints" / "classifier_mnist5k_audit.pt")
