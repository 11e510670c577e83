"""The removal test's fine-tune (models/training/removal.py): runs differ only by the removed images' rows, in one
batch order with the teacher trainer's timesteps and noise, and the shared first steps change no result."""
import pytest
import torch

from models.io.errors import PipelineError
from models.nets.teacher import MNISTDiffusion, TeacherConfig
from models.training.removal import RemovalFinetune, RemovalFinetuner, denoising_loss, epoch_order
from models.training.teacher import training_batch

N, BATCH = 40, 8  # 5 steps per epoch
OPTS = RemovalFinetune(batch_size=BATCH, lr=1e-3, seed=3)
CANDIDATES = [1, 7, 12, 30, 33, 39]


def tiny_teacher() -> MNISTDiffusion:
    torch.manual_seed(0)
    return MNISTDiffusion(TeacherConfig(base_dim=4, timesteps=50)).eval()


def tiny_images() -> torch.Tensor:
    return torch.rand((N, 1, 28, 28), generator=torch.Generator().manual_seed(1)) * 2 - 1


def weights_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_epoch_order_is_the_trainers_with_the_candidates_last():
    plain = epoch_order(OPTS.seed, N, BATCH)
    trainer = torch.cat([training_batch(OPTS.seed, s, N // BATCH, BATCH, N, 50)[0] for s in range(N // BATCH)])
    assert torch.equal(plain, trainer)
    moved = epoch_order(OPTS.seed, N, BATCH, CANDIDATES)
    assert sorted(moved.tolist()) == list(range(N)) and set(moved[-len(CANDIDATES):].tolist()) == set(CANDIDATES)
    kept_order = [i for i in plain.tolist() if i not in CANDIDATES]
    assert moved[:-len(CANDIDATES)].tolist() == kept_order[:N - len(CANDIDATES)]


def test_runs_differ_only_by_the_removed_rows_and_the_shared_steps_change_nothing():
    teacher, images = tiny_teacher(), tiny_images()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    shared = RemovalFinetuner(teacher, images, OPTS, CANDIDATES)
    assert shared.shared_steps == 4 and shared.steps_per_run == 1  # 6 candidates fill part of the last batch
    control = shared.run([])
    assert not weights_equal(control, teacher)  # it trained
    removed = shared.run([7, 30])
    assert not weights_equal(removed, control)
    assert weights_equal(shared.run([]), control)  # a run leaves the shared state as it found it
    from_start = RemovalFinetuner(teacher, images, OPTS, CANDIDATES, share_prefix=False)
    assert from_start.shared_steps == 0
    assert weights_equal(from_start.run([7, 30]), removed) and weights_equal(from_start.run([]), control)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # the input is not changed
    assert not any(p.requires_grad for p in control.parameters()) and not control.training
    with pytest.raises(PipelineError, match="not among the candidates"):
        shared.run([2])


def test_denoising_loss_is_per_image():
    teacher, images = tiny_teacher(), tiny_images()
    loss = denoising_loss(teacher, images, n_timesteps=4)
    assert loss.shape == (N,) and (loss > 0).all()
    torch.testing.assert_close(denoising_loss(teacher, images[:3], n_timesteps=4), loss[:3])


@pytest.mark.parametrize("opts, candidates, message", [
    (OPTS, [N], "must lie in"),
    (RemovalFinetune(batch_size=N + 1), [], "batch_size must lie in"),
    (RemovalFinetune(batch_size=BATCH, lr=0.0), [], "lr must be positive"),
    (RemovalFinetune(batch_size=32), list(range(33)), "do not fit in one epoch"),
])
def test_bad_fine_tune_options_are_refused(opts, candidates, message):
    with pytest.raises(PipelineError, match=message):
        RemovalFinetuner(tiny_teacher(), tiny_images(), opts, candidates)
