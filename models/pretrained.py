"""Pretrained weights: teachers and students read from their checkpoints, the one loader of every stage.

Supported layouts (keys may carry DistributedDataParallel's 'module.' prefix):
  moco         {'state_dict': {'module.encoder_q.<backbone>', 'module.encoder_q.fc.*'}, 'arch', ...}
               head fc.0/fc.2 (v2 MLP) or fc.weight/fc.bias (v1 linear); encoder_k and queue ignored.
  swav         plain state dict {'module.<backbone>', 'module.projection_head.{0,1,3}.*',
               'module.prototypes.weight'}; the prototypes are not needed and are dropped.
  torchvision  plain backbone state dict (torchvision's layout; efficientnet_pytorch's for
               efficientnet_b0); the classifier (fc.* / classifier.* / _fc.*) is dropped.
  bingo        this project's distillation checkpoint {'student': Embedder state dict, 'arch', ...}
               (utils/checkpoint.py, the home of its layout).
`read_pretrained` reads a file once into a Weights record, `Weights.build` puts its tensors into a
network, `load_pretrained` does both; `evaluated_backbone` is stage 3's backbone and its record.
Every load is strict: a missing, unexpected or mis-shaped key is a CheckpointError, never skipped.
"""
import dataclasses
import os
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn as nn

from models.backbones import CLASSIFIER_PREFIXES, build_backbone
from models.heads import Embedder, moco_head, swav_head
from utils import checkpoint
from utils.checkpoint import CheckpointError

FORMATS = ('auto', 'moco', 'swav', 'torchvision', 'bingo')

_EXPECTED_LAYOUT = {
    'moco': "{'state_dict': {'module.encoder_q.*': tensor, ...}, ...}",
    'swav': "a state dict of tensors ('module.*', 'module.projection_head.*', 'module.prototypes.*')",
    'torchvision': "a state dict of tensors ('conv1.*', 'layer1.*', ..., 'features.*' or '_conv_stem.*')",
    'bingo': "{'student': {'backbone.*': tensor, 'head.*': tensor}, 'arch': str, ...}",
}


@dataclasses.dataclass
class Weights:
    """Tensors read from a checkpoint, renamed to this project's module names."""
    path: str                   # the file, for messages
    fmt: str                    # the format the file was read as (never 'auto')
    backbone: dict              # torchvision names: 'conv1.weight', 'layer1.0.bn1.running_mean', ...
    head: dict                  # projection head, Sequential names ('0.weight', ...) or {} if none
    head_kind: Optional[str]    # 'moco', 'swav', 'linear' or None (no head in the file)
    arch: Optional[str] = None  # the architecture the file records, if it records one
    origin: dict = dataclasses.field(default_factory=dict)  # a distillation run's record (run_origin)

    def build(self, arch, with_head=False):
        """Backbone `arch` with these weights; with_head: the Embedder (backbone -> the file's
        projection head -> L2-normalise), as stage 2 needs its teacher. Returned as built;
        freezing it is the caller's choice."""
        recorded = f", the file records arch '{self.arch}'" if self.arch and self.arch != arch else ''
        where = f"checkpoint {self.path} (format '{self.fmt}') into arch '{arch}'{recorded}"
        backbone = build_backbone(arch)
        _load_strict(backbone, self.backbone, 'backbone', where)
        if not with_head:
            return backbone
        if self.head_kind is None:
            # SPEC's teacher key is the output of the head the teacher was pretrained with; a pooled
            # feature in its place would be another method, so a bare backbone teaches stage 1 only.
            raise CheckpointError(f'{where}: the file has no projection head, so it cannot be the teacher of '
                                  'stage 2 (main_distill.py needs the head the teacher was pretrained with: '
                                  "a 'moco', 'swav' or 'bingo' checkpoint); a bare backbone (torchvision, DINO, "
                                  'Barlow Twins releases) serves stage 1, knn_extract.py, only')
        head = _build_head(self, backbone.feature_dim, where)
        _load_strict(head, self.head, 'head', where)
        return Embedder(backbone, head)


def _preview(keys, shown=5):
    keys = list(keys)
    more = f', ... ({len(keys)} in all)' if len(keys) > shown else ''
    return ', '.join(str(k) for k in keys[:shown]) + more


def _tensor_dict(obj):
    """obj as {name: tensor} with any 'module.' prefix removed, or None if it is not one."""
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        return None
    return {k.removeprefix('module.'): v for k, v in obj.items()}


def _model_state(obj, fmt):
    """The tensor dict holding the model in a checkpoint of format `fmt`, or None."""
    if fmt == 'bingo':
        return _tensor_dict(checkpoint.student_weights(obj))
    # Training checkpoints wrap the model in 'state_dict'; released SwAV/torchvision files do not.
    state = _tensor_dict(obj.get('state_dict', obj))
    if fmt == 'moco' and state is not None and not any(k.startswith('encoder_q.') for k in state):
        return None
    return state


def _detect_format(obj):
    if _model_state(obj, 'bingo') is not None:
        return 'bingo'
    state = _model_state(obj, 'torchvision')
    if state is None:
        return None
    if any(k.startswith('encoder_q.') for k in state):
        return 'moco'
    if any(k.startswith(('projection_head.', 'prototypes.')) for k in state):
        return 'swav'
    if any(k.startswith(('conv1.', 'features.', '_conv_stem.')) for k in state):
        return 'torchvision'
    return None


def _split_off(state, prefix):
    """(keys outside `prefix`, keys inside it with the prefix removed)."""
    outside = {k: v for k, v in state.items() if not k.startswith(prefix)}
    inside = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return outside, inside


def _split_moco(state):
    encoder = {k.removeprefix('encoder_q.'): v for k, v in state.items() if k.startswith('encoder_q.')}
    return _split_off(encoder, 'fc.')


def _split_swav(state):
    without_prototypes, _ = _split_off(state, 'prototypes.')
    return _split_off(without_prototypes, 'projection_head.')


def _split_torchvision(state):
    return {k: v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}, {}


def _split_bingo(state):
    backbone, head = _split_off(state, 'head.')
    return {k.removeprefix('backbone.'): v for k, v in backbone.items()}, head


_SPLITTERS = {'moco': _split_moco, 'swav': _split_swav,
              'torchvision': _split_torchvision, 'bingo': _split_bingo}


def _head_kind(head, path, fmt):
    if not head:
        return None
    if '1.running_mean' in head:
        return 'swav'
    if '2.weight' in head:
        return 'moco'
    if 'weight' in head:
        return 'linear'
    raise CheckpointError(f"checkpoint {path} (format '{fmt}') has a projection head of unknown "
                          f'layout, keys: {_preview(sorted(head))}')


def read_pretrained(path, fmt='auto'):
    """Read `path` as checkpoint format `fmt` ('auto' detects it) into a Weights record."""
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format '{fmt}' for {path}; choose one of {', '.join(FORMATS)}")
    obj = checkpoint.load(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'checkpoint {path} holds a {type(obj).__name__}, expected a dict')
    if fmt == 'auto':
        fmt = _detect_format(obj)
        if fmt is None:
            raise CheckpointError(
                f'cannot tell the format of checkpoint {path} (top-level keys: {_preview(obj)}); '
                'expected one of: ' + '; '.join(f'{k} {v}' for k, v in _EXPECTED_LAYOUT.items()))
    state = _model_state(obj, fmt)
    if state is None:
        raise CheckpointError(f"checkpoint {path} is not in format '{fmt}': expected "
                              f'{_EXPECTED_LAYOUT[fmt]}, found top-level keys {_preview(obj)}')
    backbone, head = _SPLITTERS[fmt](state)
    arch = obj.get('arch') if isinstance(obj.get('arch'), str) else None
    return Weights(os.fspath(path), fmt, backbone, head, _head_kind(head, path, fmt), arch,
                   checkpoint.run_origin(obj))


def _build_head(weights, feature_dim, where):
    """The head module for `weights`, its dimensions read from the tensor shapes."""
    first, last = {'moco': ('0.weight', '2.weight'), 'swav': ('0.weight', '3.weight'),
                   'linear': ('weight', 'weight')}[weights.head_kind]
    for key in (first, last):
        if key not in weights.head or weights.head[key].dim() != 2:
            raise CheckpointError(f"cannot build the {weights.head_kind} head of {where}: "
                                  f"'{key}' missing or not a matrix")
    hidden_dim, in_dim = weights.head[first].shape
    out_dim = weights.head[last].shape[0]
    if in_dim != feature_dim:
        raise CheckpointError(f'cannot load the head of {where}: it takes {in_dim}-d input, '
                              f'the backbone gives {feature_dim}-d features')
    if weights.head_kind == 'moco':
        return moco_head(in_dim, hidden_dim, out_dim)
    if weights.head_kind == 'swav':
        return swav_head(in_dim, hidden_dim, out_dim)
    return nn.Linear(in_dim, out_dim)


def _load_strict(module, state, part, where):
    """load_state_dict(strict=True), reporting every missing/unexpected/mis-shaped key first."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]  # in module order, easiest to read
    unexpected = [k for k in state if k not in expected]
    mismatched = [f'{k} {tuple(state[k].shape)} vs {tuple(t.shape)}'
                  for k, t in expected.items() if k in state and state[k].shape != t.shape]
    problems = [f'{what}: {_preview(keys)}' for what, keys in (
        ('missing keys', missing), ('unexpected keys', unexpected),
        ('shape mismatch (checkpoint vs model)', mismatched)) if keys]
    if problems:
        raise CheckpointError(f'cannot load the {part} of {where}: ' + '; '.join(problems))
    module.load_state_dict(state, strict=True)


def load_pretrained(arch, path, fmt='auto', with_head=False):
    """Backbone `arch` with the weights of `path` (with_head: the Embedder, see Weights.build)."""
    return read_pretrained(path, fmt).build(arch, with_head)


DEFAULT_ARCH = 'resnet18'  # stage 3's backbone when neither --arch nor the checkpoint names one


def evaluated_backbone(pretrained, fmt='auto', arch=None):
    """(backbone, source) of stage 3: the backbone of `pretrained`, read once, or for 'random'
    `arch` at random initialisation (a baseline; torch's RNG draws it). `arch` defaults to the one
    the file records, else DEFAULT_ARCH, and must agree with it when given. `source` is what a
    result file records of the backbone: 'arch', 'pretrained' and the distillation run's origin."""
    if pretrained == 'random':
        arch = arch or DEFAULT_ARCH
        return build_backbone(arch), {'arch': arch, 'pretrained': 'random', 'method': 'random init'}
    weights = read_pretrained(pretrained, fmt)
    if arch and weights.arch and arch != weights.arch:
        raise CheckpointError(f"--arch='{arch}', but checkpoint {pretrained} records arch '{weights.arch}': "
                              'leave --arch out or pass the one it records')
    arch = arch or weights.arch or DEFAULT_ARCH
    return weights.build(arch), {'arch': arch, 'pretrained': os.path.abspath(pretrained), **weights.origin}
