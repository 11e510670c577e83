"""The feature classifier and the metrics built on it: closed-form checks, then the shipped checkpoint."""
import math
from pathlib import Path

import pytest
import torch

from models.data.datasets import load_dataset, split_indices
from models.evaluation.metrics import (class_histogram, classifier_outputs, frechet_distance, image_quality_report,
                                       knn_precision_recall, mean_class_probability)
from models.io.errors import MissingInputError, PipelineError
from models.io.paths import AUDIT_CLASSIFIER
from models.nets.classifier import DEFAULT_PATH, MnistClassifier, load_classifier

REPO = Path(__file__).resolve().parents[1]


def exact_gaussian(n: int, mean: torch.Tensor, cov_root: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples whose empirical mean and (unbiased) covariance are exactly ``mean`` and ``cov_root @ cov_root.T``,
    so the Frechet distance has no sampling error to hide behind."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T
    return z @ cov_root.T + mean


def random_rotation(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = torch.randn(1000, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert abs(frechet_distance(feats, feats)) < 1e-6


def test_frechet_distance_identity_covariances_is_squared_mean_shift():
    d = torch.tensor([3.0, -4.0, 0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    eye = torch.eye(6, dtype=torch.float64)
    a = exact_gaussian(500, torch.zeros(6, dtype=torch.float64), eye, seed=1)
    b = exact_gaussian(700, d, eye, seed=2)
    assert frechet_distance(a, b) == pytest.approx(float(d.square().sum()), rel=1e-9)


def test_frechet_distance_diagonal_covariances_matches_closed_form_and_is_rotation_invariant():
    mean_a = torch.tensor([0.0, 1.0, 2.0, -1.0], dtype=torch.float64)
    mean_b = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    var_a = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    var_b = torch.tensor([4.0, 1.0, 1.0, 9.0], dtype=torch.float64)
    expected = float((mean_a - mean_b).square().sum() + (var_a.sqrt() - var_b.sqrt()).square().sum())
    a = exact_gaussian(800, mean_a, torch.diag(var_a.sqrt()), seed=3)
    b = exact_gaussian(900, mean_b, torch.diag(var_b.sqrt()), seed=4)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    q = random_rotation(4, seed=5)  # non-diagonal covariances that do not commute with anything special
    assert frechet_distance(a @ q.T, b @ q.T) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_and_rejects_mismatched_inputs():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(400, 8, generator=gen) @ torch.randn(8, 8, generator=gen)
    b = torch.randn(300, 8, generator=gen) @ torch.randn(8, 8, generator=gen) + 0.5
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 0
    with pytest.raises(PipelineError):
        frechet_distance(a, b[:, :4])
    with pytest.raises(PipelineError):
        frechet_distance(a[:1], b)


def test_knn_precision_recall_identical_far_and_shifted_sets():
    gen = torch.Generator().manual_seed(7)
    real = torch.randn(1000, 8, generator=gen)
    same_distribution = torch.randn(1000, 8, generator=gen)
    assert knn_precision_recall(real, real) == (1.0, 1.0)
    assert knn_precision_recall(real, real + 100.0) == (0.0, 0.0)
    p0, r0 = knn_precision_recall(real, same_distribution)
    p1, r1 = knn_precision_recall(real, same_distribution + 1.0)
    assert p0 > 0.8 and r0 > 0.8
    assert p1 < p0 - 0.2 and r1 < r0 - 0.2


def test_knn_precision_recall_separates_fidelity_from_coverage():
    """A generator that drops one of two modes keeps precision and loses recall."""
    gen = torch.Generator().manual_seed(8)
    modes = torch.tensor([[-10.0] + [0.0] * 7, [10.0] + [0.0] * 7])
    real = torch.randn(1000, 8, generator=gen) + modes[torch.arange(1000) % 2]
    collapsed = torch.randn(1000, 8, generator=gen) + modes[0]
    precision, recall = knn_precision_recall(real, collapsed)
    assert precision > 0.8
    assert 0.3 < recall < 0.55


def test_class_histogram_counts_argmax():
    logits = torch.zeros(4, 10)
    logits[[0, 1, 2, 3], [2, 2, 7, 9]] = 1.0
    shares = class_histogram(logits)
    assert len(shares) == 10 and math.isclose(sum(shares), 1.0)
    assert shares[2] == 0.5 and shares[7] == 0.25 and shares[9] == 0.25


def test_mean_class_probability_counts_what_argmax_drops():
    # Two images split between classes 1 and 7 (the 7 wins both argmaxes) and one sure 3.
    logits = torch.full((3, 10), -1e9)
    logits[0, [1, 7]] = torch.tensor([0.0, math.log(3.0)])  # p = 0.25 / 0.75
    logits[1, [1, 7]] = torch.tensor([0.0, math.log(3.0)])
    logits[2, 3] = 0.0
    probs = mean_class_probability(logits)
    assert len(probs) == 10 and math.isclose(sum(probs), 1.0)
    assert probs == pytest.approx([0, 0.5 / 3, 0, 1 / 3, 0, 0, 0, 1.5 / 3, 0, 0], abs=1e-7)
    assert class_histogram(logits)[1] == 0.0


def test_load_classifier_missing_file_names_the_fix(tmp_path):
    with pytest.raises(MissingInputError) as err:
        load_classifier(tmp_path / "nope.pt")
    assert err.value.exit_code == 2
    assert "train_classifier.py" in str(err.value)


def test_load_classifier_refuses_other_kinds(tmp_path):
    path = tmp_path / "teacher.pt"
    torch.save({"kind": "teacher", "model": MnistClassifier().state_dict()}, path)
    with pytest.raises(PipelineError) as err:
        load_classifier(path)
    assert not isinstance(err.value, MissingInputError)
    assert "teacher" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def shipped():
    """The shipped classifier and its (features, logits) on all 5,000 mnist5k digits."""
    classifier = load_classifier(REPO / DEFAULT_PATH)
    data = load_dataset("mnist5k", "train")
    return classifier, data, classifier_outputs(classifier, data.images)


def test_shipped_classifier_is_frozen_accurate_and_differentiable(shipped):
    classifier, data, (_, logits) = shipped
    assert not classifier.training
    assert not any(p.requires_grad for p in classifier.parameters())
    assert (logits.argmax(1) == data.labels).double().mean() > 0.97
    x = data.images[:8].clone().requires_grad_(True)  # a perceptual loss needs gradients to the input
    feats = classifier.features(x)
    assert feats.shape == (8, 128)
    feats.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(classifier.features(x).detach(), feats.detach())  # eval mode is deterministic


def test_audit_classifier_is_another_network_that_agrees_on_real_digits(shipped):
    """The audit classifier scores students that may have trained against the project classifier: it must be a
    different network (architecture, weights, feature space), yet just as right about real digits."""
    classifier, data, (feats, logits) = shipped
    audit = load_classifier(AUDIT_CLASSIFIER)
    assert not audit.training and not any(p.requires_grad for p in audit.parameters())
    assert [c.out_channels for c in audit.convs] != [c.out_channels for c in classifier.convs]
    audit_feats, audit_logits = classifier_outputs(audit, data.images)
    assert audit_feats.shape[1] != feats.shape[1]
    assert (audit_logits.argmax(1) == data.labels).double().mean() > 0.97
    assert (audit_logits.argmax(1) == logits.argmax(1)).double().mean() > 0.97


def test_noise_features_are_far_from_digit_features(shipped):
    classifier, data, (feats, _) = shipped
    half_a, half_b = split_indices(len(data), 0.5, seed=0)  # shuffled: mnist5k is sorted by label
    noise = torch.randn(2500, 1, 28, 28, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    noise_feats, _ = classifier_outputs(classifier, noise)
    digits_vs_digits = frechet_distance(feats[half_a], feats[half_b])
    assert frechet_distance(noise_feats, feats[half_a]) > 10 * digits_vs_digits


def test_image_quality_report_on_real_digits(shipped):
    classifier, data, _ = shipped
    half_a, half_b = split_indices(len(data), 0.5, seed=1)
    report = image_quality_report(data.images[half_a[:1000]], classifier, data.images[half_b[:1000]])
    assert set(report) == {"frechet_distance", "precision", "recall", "mean_confidence", "class_shares",
                           "mean_class_probability", "n", "n_real"}
    assert report["n"] == 1000 and report["n_real"] == 1000
    assert report["precision"] > 0.7 and report["recall"] > 0.7
    assert report["mean_confidence"] > 0.9
    assert len(report["class_shares"]) == 10 and all(0.05 < s < 0.15 for s in report["class_shares"])
    assert all(0.05 < p < 0.15 for p in report["mean_class_probability"])


def test_kth_neighbour_radii_match_a_full_sort():
    """The k-NN radii behind precision / recall: each point's distance to its k-th nearest other point, chunk by
    chunk, as sorting every row of the full distance matrix gives it."""
    from models.evaluation.metrics import _kth_neighbour_radii
    feats = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    expected = torch.cdist(feats, feats).sort(dim=1).values[:, 3]  # column 0 is the point itself
    assert torch.allclose(_kth_neighbour_radii(feats, 3, chunk=64), expected, rtol=0, atol=1e-5)
