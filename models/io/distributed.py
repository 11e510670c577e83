"""Running a stage under torchrun: one process per GPU (or per CPU process), on one machine or several.

Without torchrun's environment (or with WORLD_SIZE=1) no process group starts and every helper here is the identity,
so a plain run is exactly the single-process stage. Under torchrun: gloo on the CPU, NCCL on CUDA (one GPU per
process, by LOCAL_RANK). Rank 0 owns every shared file (outputs, locks, logs, checkpoints); the output directory
must be on a filesystem every node sees (on one machine it always is).

Failures: a rank whose work fails prints one "error: rank R of W: ..." line and exits; torchrun then stops the
others, which exit quietly (a peer that vanished mid-collective is ``RankFailed``, not a traceback). Where every
rank checks the same thing (inputs, rank 0's decisions) ``agree`` exchanges the outcomes, so exactly one rank, the
lowest that failed, prints its line.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from .errors import PipelineError

# The longest any rank waits at a collective: rank 0's evaluation between epochs, the last round of shards.
TIMEOUT = timedelta(minutes=60)
# How long a rank that stays quiet waits before exiting: torchrun stops every rank once one exits, so the rank that
# prints the failure must exit first (its exit ends the wait).
QUIET_EXIT_GRACE_S = 10.0


class RankFailed(PipelineError):
    """Another rank failed and printed why; this one exits with the same code and no line of its own."""
    quiet = True


def _quiet(message: str, exit_code: int) -> RankFailed:
    time.sleep(QUIET_EXIT_GRACE_S)
    return RankFailed(message, exit_code)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}"

    def split(self, n: int) -> tuple[int, int]:
        """This rank's rows [lo, hi) of a global batch of n: contiguous, sizes differing by at most one."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (self.rank < extra)

    # ------------------------------------------------------------ collectives (identity when single)

    def agree(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on every rank and exchanges the outcomes: if any rank failed, the lowest such rank raises its
        error (naming itself) and the others raise RankFailed, so one line is printed in all."""
        if not self.active:
            return fn()
        try:
            result, failure = fn(), None
        except PipelineError as err:
            result, failure = None, err
        outcomes = self.gather((None if failure is None else (str(failure), failure.exit_code,
                                                              getattr(failure, "quiet", False))))
        failed = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if failed:
            loud = [(r, o) for r, o in failed if not o[2]] or failed
            first, (message, code, _) = loud[0]
            if first == self.rank and failure is not None:
                raise failure
            raise _quiet(f"rank {first} failed: {message}", code)
        return result

    def everywhere(self, fn: Callable[[], Any]) -> Any:
        """``fn`` checks values every rank holds identically (reduced losses, an all-reduced gradient norm), so all
        fail together: rank 0 prints the failure, the others exit quietly. No collective."""
        try:
            return fn()
        except PipelineError as err:
            if self.is_main or getattr(err, "quiet", False):
                raise
            raise _quiet(str(err), err.exit_code) from None

    def main_only(self, fn: Callable[[], Any]) -> Any:
        """``fn`` run by rank 0 alone (shared files, locks); its result, or its failure, reaches every rank."""
        if not self.active:
            return fn()
        result = self.agree(fn if self.is_main else (lambda: None))
        return self.broadcast(result)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.active:
            return obj
        box = [obj if self.is_main else None]
        with peer_failures("a broadcast from rank 0"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        with peer_failures("an exchange between ranks"):
            dist.all_gather_object(out, obj)
        return out

    def require_same(self, value: Any, what: str) -> None:
        """Refuses a run whose ranks disagree on ``value`` (a different teacher file on one node, say)."""
        values = self.gather(value)
        odd = [r for r, v in enumerate(values) if v != values[0]]
        if odd:
            raise PipelineError(f"ranks {odd} see another {what} than rank 0 ({values[odd[0]]} instead of "
                                f"{values[0]}); give every node the same files")

    def barrier(self) -> None:
        if self.active:
            with peer_failures("a barrier"):
                dist.barrier()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The element-wise sum over ranks of a small tensor (a new tensor; ``values`` itself when single)."""
        if not self.active:
            return values
        total = values.detach().clone()
        with peer_failures("a sum over ranks"):
            dist.all_reduce(total)
        return total

    def copy_from_main_(self, module: torch.nn.Module) -> None:
        """In place: rank 0's weights and buffers in ``module`` on every rank (what DDP does for the module it
        wraps), for a model trained beside DDP whose start must not depend on what each rank drew before."""
        if not self.active:
            return
        with peer_failures("a broadcast of weights"):
            for tensor in module.state_dict().values():
                dist.broadcast(tensor, src=0)

    def weighted_mean_(self, tensors: Iterable[torch.Tensor], weight: float) -> None:
        """In place: sum over ranks of weight * tensor, one all-reduce for all of them. With weight = this rank's
        share of the global batch, per-rank gradients of per-rank mean losses become the gradient of the global
        mean, even when the last batch splits unevenly."""
        tensors = list(tensors)
        if not self.active or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors]) * weight
        with peer_failures("a gradient all-reduce"):
            dist.all_reduce(flat)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


SINGLE = Ranks()


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(device: torch.device) -> tuple[Ranks, torch.device]:
    """The ranks of this run and its device. Under torchrun (WORLD_SIZE > 1) joins the process group (once per
    process): NCCL with cuda:LOCAL_RANK on GPUs, gloo on the CPU. Otherwise (SINGLE, device) unchanged."""
    world = launched_world_size()
    if world <= 1:
        return SINGLE, device
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "mps":
        raise PipelineError("torchrun on Apple MPS is not supported (no collective backend); add --cpu")
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        atexit.register(_stop)
    return ranks, device


_failed = False  # a failed run skips the teardown: with a peer gone, NCCL's could block the exit


def _stop() -> None:
    """At exit: every rank waits for the others (rank 0 may still be writing), then leaves the group. *Why the
    barrier:* a rank that exits first closes its connections, and gloo aborts a peer that is still using them."""
    if dist.is_initialized() and not _failed:
        try:
            dist.barrier()
        except Exception:  # a peer is gone: nothing left to tear down cleanly
            return
        dist.destroy_process_group()


def exit_process(code: int) -> None:
    """Ends a torchrun rank with ``code``, after the teardown when it succeeded: returns only when no process group
    was started. *Why not a normal exit:* gloo's worker threads outlive destroy_process_group and may still hold the
    last reference to a collective's tensors; when one drops it while the interpreter shuts down, it needs the GIL,
    the thread is killed mid-destructor and the process aborts (SIGABRT, "terminate called without an active
    exception") after a run that had finished. A rank's files are all written and closed by then, so nothing
    Python would do at shutdown is lost."""
    if not dist.is_initialized():
        return
    if code == 0:
        _stop()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _is_peer_failure(err: BaseException) -> bool:
    dist_error = getattr(dist, "DistError", ())
    return isinstance(err, dist_error) or (isinstance(err, RuntimeError) and any(
        word in str(err) for word in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset",
                                      "Socket Timeout", "timed out")))


@contextmanager
def peer_failures(during: str) -> Iterator[None]:
    """A collective that breaks because another rank died becomes RankFailed: that rank printed the reason."""
    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        if _is_peer_failure(err):
            raise RankFailed(f"lost contact with another rank during {during}; its own error line says why "
                             "(rerun the same command to resume)") from None
        raise


@contextmanager
def naming_rank(ranks: Ranks) -> Iterator[None]:
    """Around a stage under torchrun: its one-line errors name the rank that raised them, and a collective broken
    by a dead peer (inside DDP's backward, say) exits quietly instead of with a traceback."""
    global _failed
    if not ranks.active:
        yield
        return
    try:
        with peer_failures("the run"):
            yield
    except PipelineError as err:
        _failed = True
        if isinstance(err, RankFailed) or str(err).startswith(ranks.describe()):  # quiet, or named already (a
            raise                                                                 # stage inside the pipeline)
        raise PipelineError(f"{ranks.describe()}: {err}", err.exit_code) from None
    except BaseException:
        _failed = True
        raise
