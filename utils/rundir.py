"""One training run per output folder, and never a run written over another.

`claim` takes the folder's lock file (run.lock: host, pid, start time and command of its holder)
for the life of the process. A second run on the folder is refused, naming the holder; a lock
left by a process that is gone (same host, pid not running) is taken over with a message.
Temporary files left by a writer that was killed are removed once the lock is held.

`checkpoint_to_resume` is the overwrite policy: a folder that already holds a run's checkpoints is
always resumed (as --resume=auto, the way DINO does), never started afresh over, so rerunning
the same command continues an interrupted run and a finished run is left as it is.
"""
import atexit
import datetime
import json
import os
import socket
import sys

from utils import atomic, checkpoint
from utils.errors import UserError

LOCK = 'run.lock'


class RunDirError(UserError):
    """The output folder cannot be used: another run holds it, or it is not a folder."""


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read_holder(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # being written this instant, or damaged: treat as held


class RunLock:
    """The lock file of one output folder, held by this process until release()."""

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK)
        self.record = {'host': socket.gethostname(), 'pid': os.getpid(),
                       'started': datetime.datetime.now().isoformat(timespec='microseconds'),
                       'command': ' '.join(sys.argv)}

    def _is_stale(self, holder):
        return (holder is not None and holder.get('host') == self.record['host']
                and (holder.get('pid') == os.getpid() or not _alive(holder.get('pid', -1))))

    def acquire(self):
        """Take the lock; returns a note when a stale lock was taken over, else None."""
        note = None
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if not self._is_stale(holder):
                    raise RunDirError(self._held_message(holder)) from None
                os.remove(self.path)
                note = (f'took over {self.path}: its holder, pid {holder["pid"]} on {holder["host"]} '
                        f'(started {holder.get("started")}), is no longer running')
                continue
            except OSError as e:
                raise RunDirError(f'cannot create the lock file {self.path}: {e.strerror}') from e
            with os.fdopen(fd, 'w') as f:
                json.dump(self.record, f)
            return note

    def _held_message(self, holder):
        folder = os.path.dirname(self.path)
        if holder is None:
            who = 'another run'
        else:
            who = (f'pid {holder.get("pid")} on host {holder.get("host")} since {holder.get("started")} '
                   f'({holder.get("command")})')
        return (f'{folder} is in use by {who}: one run per --output_dir. Wait for it to end, choose '
                f'another --output_dir, or delete {self.path} if that run is dead')

    def release(self):
        """Remove the lock if it is still this process's."""
        if _read_holder(self.path) == self.record:
            os.remove(self.path)


def claim(folder):
    """Create `folder` if needed and hold its lock until this process exits; returns the notes to
    print (a stale lock taken over, temporary files removed)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise RunDirError(f'--output_dir={folder} is a file, not a folder')
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise RunDirError(f'cannot create --output_dir={folder}: {e.strerror}') from e
    lock = RunLock(folder)
    notes = [lock.acquire()]
    atexit.register(lock.release)
    for path in atomic.stale_temporaries(folder):
        os.remove(path)
        notes.append(f'removed {path}, left by a write that was killed')
    return [note for note in notes if note]


def checkpoint_to_resume(folder, resume):
    """(path, state, note) of the checkpoint a run continues from, or None to start afresh.

    resume: the --resume flag: a file, 'auto', or empty. A folder holding checkpoints of its own
    is resumed, with or without --resume=auto ('auto' falls back past a damaged checkpoint.pth to
    the newest intact checkpoint_<epoch>.pth); a file of the folder itself picks the checkpoint
    (e.g. an earlier epoch); a file from elsewhere may seed only a folder without checkpoints,
    which it would otherwise overwrite.
    """
    explicit = resume and resume != 'auto'
    if explicit and os.path.dirname(os.path.realpath(resume)) == os.path.realpath(folder):
        return resume, checkpoint.load(resume), None  # one of this run's own, e.g. to roll back
    own = checkpoint.load_latest(folder)
    if explicit:
        if own is not None:
            raise RunDirError(f'--resume={resume}: --output_dir={folder} holds a run of its own ({own[0]}), '
                              'which continuing another checkpoint there would overwrite; choose another '
                              '--output_dir, or pass --resume=auto to continue the run it holds')
        return resume, checkpoint.load(resume), None
    if own is not None and not resume:
        path, state, note = own
        said = (f'{folder} holds a run ({os.path.basename(path)}): resuming it, as --resume=auto '
                '(a new run needs another --output_dir)')
        return path, state, f'{note}; {said}' if note else said
    return own
