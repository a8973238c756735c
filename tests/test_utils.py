"""Distributed helpers on 2 gloo processes, the queue, atomic checkpoints and the schedule."""
import math
import os

import pytest
import torch

from models.distill import KeyQueue
from tests.multiprocess import run_on_processes
from utils import atomic, checkpoint, dist
from utils.schedule import cosine_lr


def _gather_and_shuffle(rank, out_dir):
    x = torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * rank  # rank-specific rows
    gathered = dist.all_gather_cat(x)
    assert torch.equal(gathered, torch.cat([torch.arange(6.).view(3, 2), torch.arange(6.).view(3, 2) + 100]))
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(3))  # alike on every rank
    shuffled = dist.shuffle_across_node(x, perm)
    # A row-wise function evaluated on the shuffled batch, then put back in this rank's order.
    restored = dist.unshuffle(shuffled * 2 + 1, perm)
    assert torch.equal(restored, x * 2 + 1)
    torch.save({'shuffled': shuffled, 'perm': perm}, os.path.join(out_dir, f'rank{rank}.pt'))


@pytest.mark.slow
def test_shuffle_bn_mixes_ranks_and_unshuffles(tmp_path):
    run_on_processes(_gather_and_shuffle, 2, (str(tmp_path),))
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt') for r in (0, 1))
    assert torch.equal(r0['perm'], r1['perm'])
    rows = torch.cat([r0['shuffled'], r1['shuffled']])
    # Every row of the node batch lands on exactly one rank.
    assert sorted(rows[:, 0].tolist()) == [0., 2., 4., 100., 102., 104.]


def test_single_process_shuffle_is_a_permutation():
    x = torch.randn(5, 3)
    perm = torch.randperm(5)
    shuffled = dist.shuffle_across_node(x, perm)
    assert torch.equal(shuffled, x[perm])
    assert torch.equal(dist.unshuffle(shuffled, perm), x)


def test_queue_is_fifo_and_wraps():
    queue = KeyQueue(6, 2)
    assert torch.allclose(queue.keys.norm(dim=1), torch.ones(6))
    for step in range(4):
        queue.push(torch.full((3, 2), float(step)))
    # 4 pushes of 3 into 6 rows: rows 0-2 hold step 2, rows 3-5 step 3, pointer back at 0.
    assert queue.keys[:3].eq(2).all() and queue.keys[3:].eq(3).all() and queue.ptr.item() == 0


def test_save_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    atomic.save_atomic({'epoch': 1}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError):
        atomic.save_atomic({'epoch': 2, 'bad': Unpicklable()}, str(path))
    assert checkpoint.load(str(path)) == {'epoch': 1}
    assert os.listdir(tmp_path) == ['checkpoint.pth']  # no temporary left behind


def test_cosine_schedule_matches_released_formula():
    assert cosine_lr(0.03, 0, 200) == 0.03
    assert math.isclose(cosine_lr(0.03, 100, 200), 0.015)
    assert math.isclose(cosine_lr(30, 60, 120, min_lr=0.01), 0.01 + (30 - 0.01) * 0.5)


def test_atomic_files_get_the_usual_permissions(tmp_path):
    atomic.save_atomic({'epoch': 1}, str(tmp_path / 'a.pth'))
    open(tmp_path / 'b', 'w').close()  # what a plain open() gives under this umask
    assert os.stat(tmp_path / 'a.pth').st_mode & 0o777 == os.stat(tmp_path / 'b').st_mode & 0o777
