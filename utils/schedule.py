"""Learning-rate schedules of the released scripts: cosine, stepped once per epoch."""
import math


def cosine_lr(base_lr: float, epoch: int, epochs: int, min_lr: float = 0.0) -> float:
    """lr for `epoch` (0-based): min_lr + (base_lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2."""
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group['lr'] = lr
