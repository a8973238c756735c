"""Failures in process: one-line errors, writes and reads of damaged files, the run folder's lock
and resume policy, stop signals, and the data order a run resumed mid-epoch relies on."""
import json
import os
import resource
import signal
import socket
import subprocess
import sys

import pytest
import torch
from absl import app

from data.folder import DataError
from utils import atomic, checkpoint, errors, preemption, rundir
from utils.atomic import SaveError
from utils.checkpoint import CheckpointError
from utils.training import epoch_batches, make_loader, rng_state
from tests.helpers import REPO
from tests.multiprocess import torchrun, torchrun_env


# ------------------------------------------------------------------ one-line errors

def _raise(error):
    def main(argv):
        raise error
    return main


@pytest.mark.parametrize('error, status', [
    (DataError('cannot read image /d/x.png: truncated'), 1),
    (app.UsageError('--batch_size=3 is not divisible by 2 processes'), 1),
    (preemption.Preempted('SIGTERM at epoch 0 step 2/3'), preemption.PREEMPTED_EXIT),
])
def test_expected_failures_end_as_one_line(capsys, monkeypatch, error, status):
    monkeypatch.delenv(errors.TRACEBACK_ENV, raising=False)
    assert errors.guarded(_raise(error), [], 'prog.py') == status
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith('prog.py: ') and str(error) in lines[0]


def test_traceback_on_request_and_for_bugs(monkeypatch):
    monkeypatch.setenv(errors.TRACEBACK_ENV, '1')
    with pytest.raises(DataError):
        errors.guarded(_raise(DataError('bad')), [], 'prog.py')
    monkeypatch.delenv(errors.TRACEBACK_ENV)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        errors.guarded(_raise(ZeroDivisionError('x')), [], 'prog.py')


def test_error_from_a_loader_worker_keeps_only_its_message(capsys, tmp_path):
    (tmp_path / 'cat').mkdir()
    (tmp_path / 'cat' / 'a.png').write_bytes(b'not a png')
    from data.folder import ImageFolder

    def main(argv):
        loader = torch.utils.data.DataLoader(ImageFolder(tmp_path), num_workers=1, collate_fn=list)
        next(iter(loader))
    assert errors.guarded(main, [], 'prog.py') == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'prog.py: error: cannot read image {tmp_path}/cat/a.png')


# ------------------------------------------------------------------ writing and reading files

def test_a_failed_write_names_the_file_and_the_os_cause_and_leaves_no_temporary(tmp_path):
    # A file-size limit makes the OS refuse the write, as a full disk does (EFBIG instead of ENOSPC).
    path = str(tmp_path / 'checkpoint.pth')
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(SaveError, match=f'^file too large writing {path}$'):
            atomic.save_atomic({'w': torch.zeros(10_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_a_failed_save_with_loader_workers_still_exits(tiny_folder, tmp_path):
    # The loader's workers ignore SIGTERM (preemption is the main process's to handle), so the error
    # exit must end them itself (stop_workers): the workers training loaders keep across epochs hung it.
    # A file-size limit makes the checkpoint's save fail, as a full disk does.
    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    out = str(tmp_path / 'full')
    flags = dict(method='moco', data_dir=tiny_folder, output_dir=out, arch='resnet18', image_size=32,
                 batch_size=8, queue_size=16, epochs=2, workers=1, device='cpu')
    done = subprocess.run(torchrun(1) + [os.path.join(REPO, 'main_distill.py')] + [f'--{k}={v}' for k, v in flags.items()],
                          cwd=REPO, env=torchrun_env(), capture_output=True, text=True, timeout=120,
                          preexec_fn=limit_file_size)
    assert done.returncode == 1 and f'file too large writing {out}/checkpoint.pth' in done.stderr


def test_an_interrupted_write_leaves_no_temporary(tmp_path):
    def interrupted(f):
        f.write(b'partial')
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic.write_atomic(str(tmp_path / 'x.pth'), interrupted)
    assert os.listdir(tmp_path) == []


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path):
    (tmp_path / 'a_folder').mkdir()
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(SaveError, match='--output=.*a_folder is a folder'):
        atomic.check_writable(str(tmp_path / 'a_folder'), '--output')
    with pytest.raises(SaveError, match='a_file is a file, not a folder'):
        atomic.check_writable(str(tmp_path / 'a_file' / 'sub' / 'bags.npy'), '--output')
    atomic.check_writable(str(tmp_path / 'new' / 'bags.npy'), '--output')


@pytest.fixture
def damaged(tmp_path):
    """{kind: path} of checkpoints that cannot be read."""
    torch.save({'w': torch.randn(1000)}, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'truncated.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'empty.pth').write_bytes(b'')
    (tmp_path / 'text.pth').write_text('hello\n')
    (tmp_path / 'folder.pth').mkdir()
    return {kind: str(tmp_path / f'{kind}.pth') for kind in ('truncated', 'empty', 'text', 'folder')}


@pytest.mark.parametrize('kind, message', [
    ('truncated', 'is truncated or damaged'), ('empty', 'is empty (0 bytes)'),
    ('text', 'is truncated or not a checkpoint'), ('folder', 'is a folder, not a checkpoint file')])
def test_unreadable_checkpoints_name_the_file_and_what_is_wrong(damaged, kind, message):
    with pytest.raises(CheckpointError) as caught:
        checkpoint.load(damaged[kind])
    assert str(caught.value).startswith(f'{damaged[kind]} {message}')


def test_resume_falls_back_past_a_damaged_latest_checkpoint(tmp_path):
    for epoch in (10, 20, 30):
        atomic.save_atomic({'epoch': epoch}, str(tmp_path / f'checkpoint_{epoch:04d}.pth'))
    (tmp_path / 'checkpoint_0030.pth').write_bytes(b'PK\x03\x04 torn')
    (tmp_path / 'checkpoint.pth').write_bytes(b'')
    path, state, note = checkpoint.load_latest(str(tmp_path))
    assert path.endswith('checkpoint_0020.pth') and state == {'epoch': 20}
    assert 'checkpoint.pth is empty' in note and 'checkpoint_0030.pth is truncated' in note
    assert 'resuming from' in note and path in note
    for name in os.listdir(tmp_path):
        os.remove(tmp_path / name)
    assert checkpoint.load_latest(str(tmp_path)) is None
    (tmp_path / 'checkpoint.pth').write_text('junk')
    with pytest.raises(CheckpointError, match='no intact checkpoint'):
        checkpoint.load_latest(str(tmp_path))


def test_changed_flags_lists_every_change_with_old_and_new_values():
    saved = {'lr': 0.03, 'queue_size': 65536, 'seed': 0}
    current = {'lr': 0.1, 'queue_size': 4096, 'seed': 0, 'lam': ['0.5', '0.5']}
    assert checkpoint.changed_flags(saved, current, ('lr', 'queue_size', 'seed', 'lam')) == [
        '--lr: 0.03 -> 0.1', '--queue_size: 65536 -> 4096']


# ------------------------------------------------------------------ the run folder

def _dead_pid():
    process = subprocess.Popen([sys.executable, '-c', ''])
    process.wait()
    return process.pid


def _write_lock(folder, pid):
    holder = {'host': socket.gethostname(), 'pid': pid, 'started': '2026-01-01T00:00:00', 'command': 'x'}
    (folder / rundir.LOCK).write_text(json.dumps(holder))


def test_one_run_per_output_dir(tmp_path):
    _write_lock(tmp_path, os.getppid())  # a live process
    with pytest.raises(rundir.RunDirError, match=f'in use by pid {os.getppid()} on host'):
        rundir.claim(str(tmp_path))
    _write_lock(tmp_path, _dead_pid())
    (tmp_path / '.checkpoint.pth.abcd1234.tmp').write_bytes(b'torn')
    notes = rundir.claim(str(tmp_path))
    assert 'is no longer running' in notes[0] and '.checkpoint.pth.abcd1234.tmp' in notes[1]
    assert sorted(os.listdir(tmp_path)) == [rundir.LOCK]
    assert json.loads((tmp_path / rundir.LOCK).read_text())['pid'] == os.getpid()
    rundir.RunLock(str(tmp_path)).release()  # another record: not its lock, so it stays
    assert os.listdir(tmp_path) == [rundir.LOCK]


def test_a_folder_with_a_run_is_resumed_never_started_over(tmp_path):
    assert rundir.checkpoint_to_resume(str(tmp_path), None) is None
    atomic.save_atomic({'epoch': 3}, str(tmp_path / 'checkpoint.pth'))
    path, state, note = rundir.checkpoint_to_resume(str(tmp_path), None)
    assert state == {'epoch': 3} and 'resuming it, as --resume=auto' in note
    assert rundir.checkpoint_to_resume(str(tmp_path), 'auto')[2] is None
    other = tmp_path.parent / f'{tmp_path.name}_other.pth'
    atomic.save_atomic({'epoch': 9}, str(other))
    with pytest.raises(rundir.RunDirError, match='holds a run of its own'):
        rundir.checkpoint_to_resume(str(tmp_path), str(other))
    assert rundir.checkpoint_to_resume(str(tmp_path / 'empty_run'), str(other))[1] == {'epoch': 9}


# ------------------------------------------------------------------ stop signals

@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_recorded_for_the_step_to_finish_and_handlers_restored(signum):
    before = signal.getsignal(signum)
    stop = preemption.StopSignal()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), signum)  # handled: this process goes on
        assert stop.requested() and stop.received == signal.Signals(signum).name
        if signum == signal.SIGINT:  # Ctrl-C twice stops at once
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signum)
    finally:
        stop.close()
    assert signal.getsignal(signum) is before


# ------------------------------------------------------------------ data order mid-epoch

class _RandomSamples(torch.utils.data.Dataset):
    """Sample i -> (i, a draw of torch's RNG): what an augmentation would draw."""

    def __len__(self):
        return 21

    def __getitem__(self, i):
        return i, torch.rand(())


def _epoch(workers, first_step=0, rng=None):
    loader, _ = make_loader(_RandomSamples(), 4, workers, train=True, seed=3)
    batches = [batch for _, batch in epoch_batches(loader, 3, 1, 0, first_step, rng)]
    return batches, torch.rand(3)  # and the next draws of the training step


def _same(batches, others):
    return len(batches) == len(others) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, others))


def test_an_epoch_resumed_at_a_step_continues_with_the_same_samples_and_draws():
    full, _ = _epoch(workers=0)
    indices = torch.cat([i for i, _ in full]).tolist()
    assert len(full) == 5 and len(set(indices)) == 20  # 21 samples, batch 4: the last one dropped
    # Worker processes, whose own RNG streams differ, give the same samples and draws.
    assert _same(_epoch(workers=2)[0], full)
    # A run stopped after step 1 saves the RNG state of that moment ...
    loader, _ = make_loader(_RandomSamples(), 4, 0, train=True, seed=3)
    for step, _ in epoch_batches(loader, 3, 1, 0):
        if step == 1:
            break
    state = rng_state(torch.device('cpu'))
    expected_next = torch.rand(3)
    # ... and, in a new process (other RNG state), resumes at step 2 with the same batches, and
    # the training step's own draws continue where they were.
    torch.manual_seed(12345)
    tail, next_draws = _epoch(workers=2, first_step=2, rng=state)
    assert _same(tail, full[2:]) and torch.equal(next_draws, expected_next)
