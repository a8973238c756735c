"""Export a distilled ResNet student to detectron2's pickled weight format, for detection transfer.

    python tools/convert_to_detectron2.py runs/r18_swav_w2/checkpoint.pth r18_bingo.pkl
    python tools/convert_to_detectron2.py runs/r18_swav_w2/student_backbone.pth r18_bingo.pkl --arch=resnet18

The input is a distillation checkpoint (its student backbone; the head is dropped) or the exported
student_backbone.pth (pass --arch: that file does not record it); any backbone checkpoint
main_lincls.py reads works. The output is a pickle of {'model': {name: numpy array},
'__author__': 'bingo', 'matching_heuristics': True}, which detectron2's checkpointer loads through
MODEL.WEIGHTS. torchvision names become detectron2's:

    conv1 / bn1                    -> stem.conv1 / stem.conv1.norm
    layer<N>.<b>.conv<K> / bn<K>   -> res<N+1>.<b>.conv<K> / res<N+1>.<b>.conv<K>.norm
    layer<N>.<b>.downsample.0 / .1 -> res<N+1>.<b>.shortcut / res<N+1>.<b>.shortcut.norm

BatchNorm's weight, bias, running_mean and running_var keep their names. num_batches_tracked is
dropped: it counts training steps, it is not a weight, and detectron2's norms have no such buffer.
torchvision's Bottleneck strides in its 3x3 conv, so detectron2 needs RESNETS.STRIDE_IN_1X1=False;
see the README for the whole configuration.
"""
import argparse
import os
import pickle
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.pretrained import FORMATS, read_pretrained  # noqa: E402
from utils.atomic import write_atomic  # noqa: E402

# torchvision ResNets, the layout detectron2's ResNet mirrors (SwAV's wide ResNets pad their stem
# differently, and the other backbones are not ResNets).
DETECTRON2_ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152')
_BLOCK_MODULE = re.compile(r'layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])')


class ExportError(ValueError):
    """A checkpoint that cannot be exported to detectron2's format."""


def detectron2_name(name):
    """detectron2's name for the torchvision ResNet tensor `name`, or None for num_batches_tracked."""
    module, _, tensor = name.rpartition('.')
    if tensor == 'num_batches_tracked':
        return None
    if module == 'conv1':
        return f'stem.conv1.{tensor}'
    if module == 'bn1':
        return f'stem.conv1.norm.{tensor}'
    match = _BLOCK_MODULE.fullmatch(module)
    if match is None:
        raise ExportError(f"'{name}' is not a tensor of a torchvision ResNet backbone")
    stage, block, part = int(match[1]) + 1, match[2], match[3]
    if part.startswith('bn'):
        part = f'conv{part[2:]}.norm'
    elif part.startswith('downsample'):
        part = 'shortcut' if part.endswith('0') else 'shortcut.norm'
    return f'res{stage}.{block}.{part}.{tensor}'


def to_detectron2(state_dict):
    """{detectron2 name: float numpy array} of a torchvision ResNet backbone state dict."""
    model = {}
    for name, tensor in state_dict.items():
        target = detectron2_name(name)
        if target is not None:
            model[target] = tensor.detach().cpu().numpy()
    return model


def export(checkpoint, output, arch=None, fmt='auto'):
    """Write `checkpoint`'s ResNet backbone to `output` in detectron2's format; returns the model dict.

    The backbone is loaded strictly into `arch` (default: the architecture the checkpoint records)
    first, so a file missing a tensor, or of another architecture, is an error, not a partial export.
    """
    weights = read_pretrained(checkpoint, fmt)
    arch = arch or weights.arch
    if arch is None:
        raise ExportError(f'{checkpoint} does not record its architecture: pass --arch (one of '
                          f'{", ".join(DETECTRON2_ARCHS)})')
    if arch not in DETECTRON2_ARCHS:
        raise ExportError(f"cannot export {checkpoint}: arch '{arch}' has no detectron2 counterpart; "
                          f'detectron2 builds {", ".join(DETECTRON2_ARCHS)}')
    model = to_detectron2(weights.build(arch).state_dict())
    record = {'model': model, '__author__': 'bingo', 'matching_heuristics': True}
    write_atomic(output, lambda f: pickle.dump(record, f))
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', help='distillation checkpoint.pth or student_backbone.pth')
    parser.add_argument('output', help='the detectron2 weight file to write (.pkl)')
    parser.add_argument('--arch', choices=DETECTRON2_ARCHS,
                        help='the backbone; default: the one the checkpoint records')
    parser.add_argument('--format', default='auto', choices=FORMATS, help='layout of the checkpoint')
    args = parser.parse_args(argv)
    model = export(args.checkpoint, args.output, args.arch, args.format)
    print(f'wrote {len(model)} tensors to {args.output}')


if __name__ == '__main__':
    main()
