"""Reading checkpoints, and the distillation run's checkpoint: the one home of its layout.

`load` is the project's one torch.load: every way a file can be unreadable becomes a
CheckpointError naming the file and what is wrong with it.

A main_distill.py run folder holds
    checkpoint.pth          the latest state: after every epoch, and at the step a stopped run saved
    checkpoint_<epoch>.pth  the state after that epoch, kept every --save_freq epochs and at the last
    student_backbone.pth    the student's backbone alone, in the layout of the library defining it
Each checkpoint is `RunCheckpoint.to_dict()`; main_distill.py writes it (`save_run`) and resumes from
it (`RunCheckpoint.from_dict`), the linear probe records where its backbone comes from
(`run_origin`) and models/pretrained.py reads its student (`student_weights`, format 'bingo').
"""
import dataclasses
import os
import pickle
import re
from typing import Optional

import torch

from utils.atomic import save_atomic, why
from utils.errors import UserError

LATEST = 'checkpoint.pth'
STUDENT_BACKBONE = 'student_backbone.pth'
_KEPT = re.compile(r'checkpoint_(\d+)\.pth$')  # checkpoint_<epoch>.pth, kept every --save_freq epochs
_ZIP_MAGIC = b'PK\x03\x04'  # torch.save's format since torch 1.6


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable, or does not fit the requested model."""


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
        raise CheckpointError(f'{why(e)} reading checkpoint {path}') from e
    except Exception as e:
        size = os.path.getsize(path)
        kind = 'truncated or damaged' if head == _ZIP_MAGIC else 'truncated or not a checkpoint'
        raise CheckpointError(f'{path} is {kind} ({size} bytes; torch.load: {_first_sentence(e)})') from e


@dataclasses.dataclass
class RunCheckpoint:
    """The state of a distillation run, as its checkpoint files hold it."""
    arch: str                    # the student's backbone
    method: str                  # bingo, moco, seed or disco
    epoch: int                   # training continues at this epoch ...
    step: int                    # ... and this step of it (0 once an epoch has finished)
    world_size: int              # processes that trained it: a mid-epoch stop resumes on as many
    rng: Optional[list]          # each rank's RNG state at a mid-epoch stop, else None
    modules: dict                # the training module's training_state(): 'student', 'queue' and, for
                                 # moco its momentum 'teacher', for disco its 'key_encoder'
    optimizer: dict
    flags: dict                  # what the run was started with (main_distill.recorded_flags)

    def to_dict(self):
        """The file's layout: one flat dict, the modules' state dicts at the top level."""
        return {'arch': self.arch, 'method': self.method, 'epoch': self.epoch, 'step': self.step,
                'world_size': self.world_size, 'rng': self.rng, **self.modules,
                'optimizer': self.optimizer, 'flags': self.flags}

    @classmethod
    def from_dict(cls, state, path):
        """Read what to_dict wrote; a file without what a run resumes from is a CheckpointError."""
        missing = [key for key in ('arch', 'method', 'epoch', 'student', 'queue', 'optimizer')
                   if not isinstance(state, dict) or key not in state]
        if missing:
            raise CheckpointError(f'{path} is not a checkpoint of main_distill.py: no {", ".join(missing)}')
        fields = {'arch', 'method', 'epoch', 'step', 'world_size', 'rng', 'optimizer', 'flags'}
        return cls(state['arch'], state['method'], state['epoch'], state.get('step', 0),
                   state.get('world_size', 1), state.get('rng'),
                   {key: value for key, value in state.items() if key not in fields},
                   state['optimizer'], state.get('flags', {}))


def kept_path(folder, epoch):
    return os.path.join(folder, f'checkpoint_{epoch:04d}.pth')


def save_run(folder, run, keep=False, student_backbone=None):
    """Write `run` (a RunCheckpoint) to <folder>/checkpoint.pth, also to checkpoint_<epoch>.pth when
    `keep`, and the state dict `student_backbone` to student_backbone.pth when given."""
    state = run.to_dict()
    save_atomic(state, os.path.join(folder, LATEST))
    if keep:
        save_atomic(state, kept_path(folder, run.epoch))
    if student_backbone is not None:
        save_atomic(student_backbone, os.path.join(folder, STUDENT_BACKBONE))


def student_weights(obj):
    """The student's state dict ('backbone.*', 'head.*') of a distillation checkpoint, else None."""
    return obj.get('student') if isinstance(obj, dict) else None


def run_origin(obj):
    """What a result file records of the run a distillation checkpoint comes from (its method,
    epochs, teacher file and backbone); {} for any other file."""
    if not (isinstance(obj, dict) and isinstance(obj.get('flags'), dict) and 'method' in obj):
        return {}
    flags = obj['flags']
    teacher = flags.get('teacher') if obj['method'] != 'moco' else None  # MoCo alone has none
    return {'method': obj['method'], 'distill_epochs': obj.get('epoch'),
            'teacher': os.path.basename(teacher) if teacher else None,
            'teacher_arch': flags.get('teacher_arch') if teacher else None}


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
