"""Files that are never half-written: write to a temporary file beside the target, then rename."""
import json
import os
import tempfile

import torch


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path, write):
    """Call write(binary file) on a temporary file next to `path`, then move it into place, so a
    crash leaves either the old file or the new one, never a torn one."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix='.' + os.path.basename(path) + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from the user's group
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_atomic(obj, path):
    """torch.save `obj` to `path` atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json_atomic(record, path):
    write_atomic(path, lambda f: f.write(json.dumps(record, indent=1, sort_keys=True).encode() + b'\n'))


def load(path):
    """Load one of this project's checkpoints (they hold plain Python objects besides tensors)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint {path} does not exist')
    return torch.load(path, map_location='cpu', weights_only=False)
