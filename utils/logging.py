"""Progress lines for long loops and a JSONL metrics file, both written by rank 0 only."""
import json
import os
import time

import torch

from utils import dist


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class JsonlWriter:
    """Appends one JSON object per line; a no-op on ranks other than 0 or without a path."""

    def __init__(self, path):
        self.path = path if dist.is_main() else None
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def write(self, record: dict):
        if self.path:
            with open(self.path, 'a') as f:
                f.write(json.dumps(record) + '\n')


class Progress:
    """Every `every` steps prints `header [step/steps] metric ... samples/s ETA` and logs it as JSONL.

    Values may be device tensors: they are summed where they live and read back only when a line
    is printed, so the training step never waits for the GPU. `total_steps` counts the whole run,
    so the ETA covers the run, not the epoch.
    """

    def __init__(self, total_steps: int, every: int = 10, metrics: JsonlWriter = None):
        self.total_steps = total_steps
        self.every = max(1, every)
        self.metrics = metrics
        self.done_steps = 0
        self.start = time.time()
        self._reset()

    def _reset(self):
        self.sums, self.count, self.samples, self.window_start = {}, 0, 0, time.time()

    def update(self, header: dict, step: int, steps: int, batch_size: int, **values):
        """Record one step of `batch_size` samples (global). Returns the window's means when it
        printed (every `every` steps and at the last step), else None."""
        self.done_steps += 1
        self.count += 1
        self.samples += batch_size
        for key, value in values.items():
            value = value.detach() if torch.is_tensor(value) else value
            self.sums[key] = self.sums[key] + value if key in self.sums else value
        if self.count < self.every and step + 1 != steps:
            return None
        now = time.time()
        rate = self.samples / max(now - self.window_start, 1e-9)
        eta = (now - self.start) / self.done_steps * (self.total_steps - self.done_steps)
        means = {key: float(total) / self.count for key, total in self.sums.items()}
        if dist.is_main():
            head = ' '.join(f'{key} {value}' for key, value in header.items())
            shown = ' '.join(f'{key} {value:.4g}' for key, value in means.items())
            print(f'{head} [{step + 1}/{steps}] {shown} samples/s {rate:.1f} eta {_duration(eta)}',
                  flush=True)
        if self.metrics:
            self.metrics.write({**header, 'step': step + 1, 'steps': steps, **means,
                                'samples_per_s': rate, 'eta_s': eta})
        self._reset()
        return means
