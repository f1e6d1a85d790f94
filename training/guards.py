"""What stops a run between optimizer steps: a preemption signal, or a student whose numbers stopped being finite.

Preemption: SIGTERM (what schedulers send before killing a job) and SIGUSR1 (SLURM's `--signal`, sent
ahead of the time limit) only set a flag. After the optimizer step in progress, every rank learns whether
any rank saw a signal (one all-reduce per step), all of them save a checkpoint together and stop with
`Preempted`; the CLI then exits with PREEMPTED_EXIT_CODE. A second signal during the save only sets the
flag again: the save finishes, and is atomic anyway (temporary folder, then rename).

Divergence: a non-finite loss or gradient norm stops the run before the optimizer step that would
spread it into the weights, and the weights are checked again before every save, so no checkpoint holds
NaN or infinite weights.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator

import torch
from torch.distributed.tensor import DTensor

from training.distributed import Dist, any_rank

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; rerun with --resume
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run saved a checkpoint after a preemption signal and stopped; rerun with --resume."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"preempted at step {step}; rerun with --resume (checkpoint {checkpoint})")
        self.step, self.checkpoint = step, checkpoint


class Diverged(ArithmeticError):
    """The student's loss, gradients or weights are no longer finite; nothing of that step was saved."""


class PreemptionFlag:
    """Set by the signal handlers; `agreed(ctx)` asks every rank (a collective, once per step)."""

    def __init__(self):
        self.signal: int | None = None

    def handle(self, signum, _frame) -> None:
        self.signal = signum

    def agreed(self, ctx: Dist) -> bool:
        return any_rank(self.signal is not None, ctx)


@contextlib.contextmanager
def preemption_signals() -> Iterator[PreemptionFlag]:
    """Install the flag-setting handlers for the duration of the loop (main thread only), then restore the old ones."""
    flag = PreemptionFlag()
    if threading.current_thread() is not threading.main_thread():  # signals reach only the main thread
        yield flag
        return
    previous = {sig: signal.signal(sig, flag.handle) for sig in PREEMPTION_SIGNALS}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def check_finite_step(loss_sum: float, grad_norm: float, step: int, latest: str) -> None:
    """Refuse the update of optimizer step `step` (1-based) when its loss or gradient norm is NaN or infinite."""
    if math.isfinite(loss_sum) and math.isfinite(grad_norm):
        return
    what = f"the loss is {loss_sum}" if not math.isfinite(loss_sum) else f"the gradient norm is {grad_norm} (loss {loss_sum})"
    raise Diverged(
        f"step {step}: {what}; the student diverged. Stopped before this step's update, so the weights were not changed and no "
        f"checkpoint was written for it (latest complete checkpoint: {latest}). Lower --lr, keep --grad-clip, bound negative "
        "tokens with --neg-loss clip, or check the Φ spec."
    )


def check_finite_weights(parameters: list[torch.Tensor], step: int, ctx: Dist) -> None:
    """Refuse to save weights (this rank's shards; every rank agrees) that hold NaN or infinity after step `step`."""
    local = [p.detach().to_local() if isinstance(p, DTensor) else p.detach() for p in parameters]
    bad = any(not torch.isfinite(t).all() for t in local)
    if any_rank(bad, ctx):
        raise Diverged(f"step {step}: the trained weights hold NaN or infinite values; not writing a checkpoint of them. "
                       "Lower --lr or check the Φ spec.")
