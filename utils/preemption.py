"""Stopping a training run on SIGTERM or SIGINT without losing its progress.

Clusters stop a job with SIGTERM, then SIGKILL after a grace period (SLURM's KillWait and
torchrun's own wait are 30 s by default). While a `StopSignal` is active, SIGTERM and SIGINT only
record the request; after each step every rank learns whether any rank received one, so all stop
after the same step, save a checkpoint that resumes there, and exit with PREEMPTED_EXIT. A second
SIGINT (Ctrl-C twice) stops at once.
"""
import os
import signal

import torch

from utils import dist
from utils.errors import UserError

PREEMPTED_EXIT = 75  # EX_TEMPFAIL (sysexits.h): stopped early; the same command continues the run
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Tests only: rank 0 sends itself SIGTERM after this many steps, a deterministic preemption.
TEST_SIGTERM_ENV = 'BINGO_TEST_SIGTERM_AFTER_STEPS'


class Preempted(UserError):
    """The run stopped on a signal after saving a checkpoint it resumes from."""
    label = 'stopped'
    exit_code = PREEMPTED_EXIT


class StopSignal:
    """From its creation until close(), SIGTERM / SIGINT ask the training loop to stop after its
    current step.

    `requested()` is called by every rank after every step and returns the same answer on all of
    them (a max-reduce of one integer over a CPU process group, so no GPU stream waits for it).
    """

    def __init__(self):
        self.received = None  # the signal's name, once any rank has received one
        self._signal = 0
        self._steps = 0
        self._sigterm_after = int(os.environ.get(TEST_SIGTERM_ENV, 0)) if dist.is_main() else 0
        self._group = dist.cpu_group()
        self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}

    def close(self):
        """Give SIGTERM and SIGINT back their previous handlers."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self._signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signal = signum
        print(f'received {signal.Signals(signum).name}: finishing this step, then saving a checkpoint '
              'to resume from', flush=True)

    def requested(self) -> bool:
        """Whether any rank has received a stop signal (collective: call it on every rank)."""
        self._steps += 1
        if self._steps == self._sigterm_after:
            os.kill(os.getpid(), signal.SIGTERM)
        flag = torch.tensor([self._signal])
        if dist.is_dist():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self._group)
        if flag.item():
            self.received = signal.Signals(int(flag.item())).name
        return self.received is not None
