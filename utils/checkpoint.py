"""The one writer and the one reader of the project's files.

Writing: to a temporary file beside the target, then renamed, so a file is never half-written; a
failed or interrupted write removes its temporary, and a failure of the OS (disk full, no
permission) is a SaveError naming the file. Reading: `load` turns every way a checkpoint can be
unreadable into a CheckpointError naming the file and what is wrong with it. Also here: what a
resumed run compares (`changed_flags`) and which checkpoint of a run folder it resumes
(`load_latest`).
"""
import json
import os
import pickle
import re
import tempfile

import torch

from utils.errors import UserError

LATEST = 'checkpoint.pth'
_KEPT = re.compile(r'checkpoint_(\d+)\.pth$')  # checkpoint_<epoch>.pth, kept every --save_freq epochs
_TEMPORARY = re.compile(r'\..+\.[a-z0-9_]{8}\.tmp$')  # write_atomic's '.<name>.<mkstemp's 8 characters>.tmp'
_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since torch 1.6


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the requested model."""


class SaveError(UserError, OSError):
    """A file could not be written (disk full, no permission, a folder in the way)."""


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _os_error(error):
    """The OSError behind `error`, if any: torch reports a failed write as a RuntimeError
    ("[enforce fail at inline_container.cc] unexpected pos ...") whose context is the OSError."""
    while error is not None:
        if isinstance(error, OSError) and error.strerror:
            return error
        error = error.__cause__ or error.__context__
    return None


def _why(os_error):
    """'no space left on device' from an OSError, to begin a message."""
    text = os_error.strerror or str(os_error)
    return text[:1].lower() + text[1:]


def write_atomic(path, write):
    """Call write(binary file) on a temporary file next to `path`, then move it into place, so a
    crash leaves either the old file or the new one, never a torn one. The temporary is removed
    on any failure, an interruption included."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    except OSError as e:
        raise SaveError(f'{_why(e)} creating a file in {folder} for {path}') from e
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the user's group
        os.replace(tmp, path)
    except BaseException as e:
        _remove_quietly(tmp)
        cause = _os_error(e) if isinstance(e, Exception) else None
        if cause is not None:
            raise SaveError(f'{_why(cause)} writing {path}') from e
        raise


def save_atomic(obj, path):
    """torch.save `obj` to `path` atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(record, path):
    write_atomic(path, lambda f: f.write(json.dumps(record, indent=1, sort_keys=True).encode() + b'\n'))


def stale_temporaries(folder):
    """Temporary files of write_atomic in `folder`: left by a process killed while writing
    (SIGKILL, power loss), which no cleanup could remove."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, name) for name in os.listdir(folder) if _TEMPORARY.match(name))


def check_writable(path, what):
    """Refuse, before any compute, a file `what` names (e.g. '--output') that write_atomic could not
    create: an existing folder, a parent that is a file, or a folder without write permission."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise SaveError(f'{what}={path} is a folder; name the file to write')
    parent = os.path.dirname(path)
    while not os.path.exists(parent):  # write_atomic creates the missing folders
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise SaveError(f'{what}={path} cannot be created: {parent} is a file, not a folder')
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SaveError(f'{what}={path} cannot be created: no permission to write in {parent}')


def _first_sentence(error):
    text = ' '.join(str(error).split())
    return f'{type(error).__name__}: {text.split(". ")[0].rstrip(".")}' if text else type(error).__name__


def load(path):
    """Read one of the project's checkpoints, or a released teacher's, on the CPU.

    Tensors, containers and primitives load with torch's safe unpickler; a file that pickles other
    Python objects needs the full one (so load only files you trust). Every failure is a
    CheckpointError naming the file: missing, a folder, empty, truncated or not a checkpoint.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f'{path} is a folder, not a checkpoint file')
    if not os.path.exists(path):
        raise CheckpointError(f'checkpoint {path} does not exist')
    try:
        with open(path, 'rb') as f:
            head = f.read(len(_ZIP_MAGIC))
        if not head:
            raise CheckpointError(f'{path} is empty (0 bytes), not a checkpoint: an interrupted copy?')
        try:
            return torch.load(path, map_location='cpu', weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location='cpu', weights_only=False)
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f'{_why(e)} reading checkpoint {path}') from e
    except Exception as e:
        size = os.path.getsize(path)
        kind = 'truncated or damaged' if head == _ZIP_MAGIC else 'truncated or not a checkpoint'
        raise CheckpointError(f'{path} is {kind} ({size} bytes; torch.load: {_first_sentence(e)})') from e


def kept_checkpoints(folder):
    """The checkpoint_<epoch>.pth files of a run folder, newest epoch first."""
    if not os.path.isdir(folder):
        return []
    kept = [(int(m.group(1)), name) for name in os.listdir(folder) if (m := _KEPT.match(name))]
    return [os.path.join(folder, name) for _, name in sorted(kept, reverse=True)]


def load_latest(folder):
    """(path, state, note) of the newest intact checkpoint of a run folder, or None if it holds none.

    checkpoint.pth is the newest; when it is missing or cannot be read, the newest readable
    checkpoint_<epoch>.pth is taken instead and `note` says so (else note is None). A folder whose
    checkpoints are all unreadable is a CheckpointError listing them.
    """
    candidates = [os.path.join(folder, LATEST)] + kept_checkpoints(folder)
    problems = []
    for path in candidates:
        if not os.path.exists(path):
            problems.append(f'{path} does not exist')
            continue
        try:
            state = load(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        note = None if path == candidates[0] else (
            f'{"; ".join(problems)}: resuming from {path} instead, the newest intact checkpoint')
        return path, state, note
    if len(problems) > 1 or os.path.exists(candidates[0]):
        raise CheckpointError(f'no intact checkpoint in {folder} to resume: ' + '; '.join(problems))
    return None


def changed_flags(saved, current, names):
    """'--name: old -> new' for each flag of `names` whose value in `current` differs from the one a
    checkpoint recorded (`saved`); flags the checkpoint does not record (added since) are skipped."""
    return [f'--{name}: {saved[name]!r} -> {current[name]!r}'
            for name in names if name in saved and saved[name] != current[name]]
