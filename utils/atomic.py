"""Atomic writes: the one way the project writes a file.

To a temporary file beside the target, then renamed, so a file is never half-written; a failed or
interrupted write removes its temporary, and a failure of the OS (disk full, no permission) is a
SaveError naming the file. Reading checkpoints is utils/checkpoint.py's.
"""
import json
import os
import re
import tempfile

import torch

from utils.errors import UserError

_TEMPORARY = re.compile(r'\..+\.[a-z0-9_]{8}\.tmp$')  # write_atomic's '.<name>.<mkstemp's 8 characters>.tmp'


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


def why(os_error):
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
        raise SaveError(f'{why(e)} creating a file in {folder} for {path}') from e
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
            raise SaveError(f'{why(cause)} writing {path}') from e
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
