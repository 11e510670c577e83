"""Data sources: values, labels and indices as documented; missing data fails with exit 2 and the fix."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import models.data.datasets as data_mod
from models.data.datasets import load_dataset, split_indices, to_model_range
from models.io.errors import MissingInputError, PipelineError

SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_mnist5k_contents(mnist5k):
    assert len(mnist5k) == 5000
    assert mnist5k.images.shape == (5000, 1, 28, 28) and mnist5k.images.dtype == torch.float32
    assert mnist5k.images.min().item() == -1.0 and mnist5k.images.max().item() == 1.0
    assert torch.bincount(mnist5k.labels).tolist() == [500] * 10
    assert bool((mnist5k.labels[1:] >= mnist5k.labels[:-1]).all()), "mnist5k is sorted by label"
    assert torch.equal(mnist5k.indices, torch.arange(5000))
    assert (mnist5k.source, mnist5k.split, mnist5k.num_classes) == ("mnist5k", "train", 10)
    # Background pixels are exactly -1 (0 in uint8), as upstream's ToTensor + Normalize(0.5, 0.5).
    assert (mnist5k.images == -1).float().mean().item() > 0.5


def test_mnist5k_has_no_test_split():
    with pytest.raises(PipelineError, match="single split"):
        load_dataset("mnist5k", "test")


def test_to_model_range():
    out = to_model_range(np.array([0, 255, 51] + [0] * 781, dtype=np.uint8))
    assert out.shape == (1, 1, 28, 28)
    assert out.flatten()[:3].tolist() == pytest.approx([-1.0, 1.0, -0.6])


def test_split_indices_shuffled_disjoint_reproducible(mnist5k):
    train, val = split_indices(5000, 0.1, seed=0)
    assert len(train) == 4500 and len(val) == 500
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(5000))
    # Shuffled, not a head/tail cut of the label-sorted set: both halves see (nearly) every class.
    assert len(set(mnist5k.labels[val].tolist())) >= 8
    assert len(set(mnist5k.labels[train].tolist())) == 10
    assert not torch.equal(val, torch.sort(val).values)
    again_train, again_val = split_indices(5000, 0.1, seed=0)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    _, other_val = split_indices(5000, 0.1, seed=1)
    assert not torch.equal(val, other_val)
    assert len(split_indices(10, 0.0, seed=0)[1]) == 0


def test_unknown_source_is_a_user_error():
    with pytest.raises(PipelineError, match="unknown dataset") as err:
        load_dataset("nosuch")
    assert err.value.exit_code == 1


def test_fashion_missing_names_the_fix(tmp_path, monkeypatch):
    missing = tmp_path / "no-fashion-here"
    monkeypatch.setenv("FASHION_MNIST_DIR", str(missing))
    monkeypatch.setattr(data_mod, "FASHION_DIR", missing)
    with pytest.raises(MissingInputError) as err:
        load_dataset("fashion-mnist")
    assert err.value.exit_code == 2
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert str(missing) in str(err.value)


def test_fashion_dir_env_var_is_read_at_import(tmp_path, repo_root):
    code = "import models.data.datasets as d; print(d.FASHION_DIR)"
    env = {"FASHION_MNIST_DIR": str(tmp_path / "elsewhere"), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "elsewhere")


def _write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_fashion_reads_idx_files(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    train_pixels = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    train_pixels[0, 0, 0], train_pixels[0, 0, 1] = 0, 255
    _write_idx(tmp_path / "train-images-idx3-ubyte", train_pixels, compress=True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([9, 0, 4]), compress=False)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", train_pixels[:2], compress=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2]), compress=True)
    monkeypatch.setattr(data_mod, "FASHION_DIR", tmp_path)
    train = load_dataset("fashion-mnist", "train")
    assert train.images.shape == (3, 1, 28, 28)
    assert train.labels.tolist() == [9, 0, 4] and train.indices.tolist() == [0, 1, 2]
    assert torch.allclose(train.images, torch.from_numpy(train_pixels).float().view(3, 1, 28, 28) / 127.5 - 1)
    assert train.images[0, 0, 0, 0].item() == -1.0 and train.images[0, 0, 0, 1].item() == 1.0
    test = load_dataset("fashion-mnist", "test")
    assert test.labels.tolist() == [1, 2] and test.split == "test"
    with pytest.raises(PipelineError):
        load_dataset("fashion-mnist", "val")


def test_mnist_without_files_or_download_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "MNIST_ROOT", tmp_path / "mnist_data")
    with pytest.raises(MissingInputError) as err:
        load_dataset("mnist", "train", download=False)
    assert err.value.exit_code == 2
    assert "--download" in str(err.value)
    assert not (tmp_path / "mnist_data" / "MNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_mnist_reads_upstream_layout_and_downloads_only_when_asked(tmp_path, monkeypatch):
    """--dataset mnist reads MNIST_ROOT/MNIST/raw (torchvision's layout, plain or .gz); --download fetches the
    missing files from a mirror, checked by md5, and a corrupted answer leaves no file behind."""
    import gzip
    import hashlib
    import io
    import urllib.request
    pixels = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    served = {}
    for name, array in (("t10k-images-idx3-ubyte", pixels), ("t10k-labels-idx1-ubyte", np.array([7, 3]))):
        _write_idx(tmp_path / name, array, compress=True)
        served[name + ".gz"] = (tmp_path / (name + ".gz")).read_bytes()
    root = tmp_path / "mnist_data"
    monkeypatch.setattr(data_mod, "MNIST_ROOT", root)
    monkeypatch.setattr(data_mod, "MNIST_MD5", {k: hashlib.md5(v).hexdigest() for k, v in served.items()})
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        return io.BytesIO(served[url.rsplit("/", 1)[1]])
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    with pytest.raises(MissingInputError):
        load_dataset("mnist", "test", download=False)
    assert requested == []
    test = load_dataset("mnist", "test", download=True)
    assert test.labels.tolist() == [7, 3] and test.split == "test" and len(requested) == 2
    assert torch.equal(test.images, data_mod.to_model_range(pixels))
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(served)
    load_dataset("mnist", "test", download=True)
    assert len(requested) == 2  # files present: nothing fetched again
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").unlink()
    served["t10k-images-idx3-ubyte.gz"] = gzip.compress(b"not mnist")
    with pytest.raises(MissingInputError) as err:
        load_dataset("mnist", "test", download=True)
    assert "checksum" in str(err.value)
    assert not (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").exists()


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed on this machine")
def test_system_fashion_mnist(monkeypatch):
    monkeypatch.setattr(data_mod, "FASHION_DIR", SYSTEM_FASHION)
    train = load_dataset("fashion-mnist", "train")
    assert train.images.shape == (60000, 1, 28, 28)
    assert train.images.min().item() >= -1.0 and train.images.max().item() <= 1.0
    assert torch.bincount(train.labels).tolist() == [6000] * 10
