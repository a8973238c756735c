"""Run a function on N gloo processes on CPU, as torchrun would set them up; launch scripts with
torchrun, or record what a launcher script would run."""
import os
import socket
import stat

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    from utils import dist
    dist.init_distributed('cpu')
    try:
        fn(rank, *args)
    finally:
        dist.cleanup()


def run_on_processes(fn, world_size=2, args=()):
    """`fn(rank, *args)` on `world_size` processes; a failure in any of them fails the caller."""
    mp.spawn(_worker, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)


def torchrun_env(threads=1) -> dict:
    """Environment for a subprocess launch: one thread per process, no GPU."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES='')
    env.pop('RANK', None)
    return env


def torchrun(nproc: int) -> list:
    """Command prefix launching a script on `nproc` local processes (or one plain process)."""
    import sys
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}',
            f'--master_port={free_port()}']


def fake_torchrun(folder):
    """(env, launches): an environment whose `torchrun` records each launch instead of running it,
    and a function returning the launches recorded since its last call, each as its argument list."""
    fake = os.path.join(folder, 'bin', 'torchrun')
    log = os.path.join(folder, 'launches')
    os.makedirs(os.path.dirname(fake))
    with open(fake, 'w') as f:
        f.write('#!/usr/bin/env bash\necho "$@" >> "$LAUNCHES"\n')
    os.chmod(fake, os.stat(fake).st_mode | stat.S_IEXEC)

    def launches():
        if not os.path.exists(log):
            return []
        with open(log) as f:
            recorded = [line.split() for line in f.read().splitlines()]
        os.remove(log)
        return recorded
    return dict(os.environ, PATH=f'{os.path.dirname(fake)}{os.pathsep}{os.environ["PATH"]}', LAUNCHES=log), launches


def flag_value(argv, name):
    """The value of the last --name=value in argv, or None."""
    values = [arg.split('=', 1)[1] for arg in argv if arg.startswith(f'--{name}=')]
    return values[-1] if values else None
