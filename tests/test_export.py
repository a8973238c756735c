"""tools/convert_to_detectron2.py: every tensor of a ResNet-18/34/50 student lands under its
detectron2 name with its shape and values, nothing is dropped but num_batches_tracked, and bad
inputs are clear errors. detectron2 itself is not needed: its names are written out here."""
import os
import pickle

import numpy as np
import pytest
import torch

from models import build_backbone, build_student
from models.pretrained import CheckpointError
from tools import convert_to_detectron2 as convert

# detectron2's ResNet: blocks per stage res2..res5, and whether blocks are bottlenecks (3 convs).
DEPTHS = {'resnet18': ((2, 2, 2, 2), False), 'resnet34': ((3, 4, 6, 3), False),
          'resnet50': ((3, 4, 6, 3), True)}
NORM = ('weight', 'bias', 'running_mean', 'running_var')


def detectron2_names(arch):
    """Every tensor name detectron2 gives ResNet `arch`'s backbone (its stem and res2..res5)."""
    blocks, bottleneck = DEPTHS[arch]
    names = ['stem.conv1.weight'] + [f'stem.conv1.norm.{n}' for n in NORM]
    for stage, count in enumerate(blocks, start=2):
        for block in range(count):
            convs = [f'conv{k}' for k in range(1, 4 if bottleneck else 3)]
            # A projection shortcut where the block changes the stride or the width: the first
            # block of res3..res5, and of res2 too in a bottleneck ResNet (64 -> 256 channels).
            if block == 0 and (stage > 2 or bottleneck):
                convs.append('shortcut')
            for conv in convs:
                prefix = f'res{stage}.{block}.{conv}'
                names += [f'{prefix}.weight'] + [f'{prefix}.norm.{n}' for n in NORM]
    return names


def torchvision_name(name):
    """The torchvision tensor a detectron2 name comes from (the mapping read backwards)."""
    name = name.replace('stem.conv1.norm.', 'bn1.').replace('stem.conv1.', 'conv1.')
    name = name.replace('.shortcut.norm.', '.downsample.1.').replace('.shortcut.', '.downsample.0.')
    for k in (1, 2, 3):
        name = name.replace(f'.conv{k}.norm.', f'.bn{k}.')
    for stage in (2, 3, 4, 5):
        name = name.replace(f'res{stage}.', f'layer{stage - 1}.')
    return name


def numbered_backbone(arch):
    """A backbone whose floating-point tensors are filled with their index: values name their source."""
    backbone = build_backbone(arch)
    with torch.no_grad():
        for i, tensor in enumerate(t for t in backbone.state_dict().values() if t.is_floating_point()):
            tensor.fill_(float(i))
    return backbone


@pytest.mark.parametrize('arch, source', [('resnet18', 'distillation checkpoint'),
                                          ('resnet34', 'student_backbone.pth'),
                                          ('resnet50', 'student_backbone.pth')])
def test_every_tensor_lands_under_its_detectron2_name(arch, source, tmp_path):
    backbone = numbered_backbone(arch)
    state = backbone.state_dict()
    if source == 'distillation checkpoint':  # main_distill.py's layout: the student with its head
        student = build_student(arch)
        student.backbone.load_state_dict(state)
        checkpoint, arch_flag = tmp_path / 'checkpoint.pth', None  # the checkpoint records its arch
        torch.save({'student': student.state_dict(), 'arch': arch, 'epoch': 200}, checkpoint)
    else:
        checkpoint, arch_flag = tmp_path / 'student_backbone.pth', arch
        torch.save(state, checkpoint)

    convert.export(checkpoint, tmp_path / 'out' / 'r.pkl', arch_flag)

    assert os.listdir(tmp_path / 'out') == ['r.pkl']  # written atomically: no temporary file left
    with open(tmp_path / 'out' / 'r.pkl', 'rb') as f:
        saved = pickle.load(f)
    assert saved['__author__'] == 'bingo' and saved['matching_heuristics'] is True
    model = saved['model']
    assert sorted(model) == sorted(detectron2_names(arch))
    exported_from = {torchvision_name(name) for name in model}
    assert [name for name in state if name not in exported_from] == [
        name for name in state if name.endswith('num_batches_tracked')]  # nothing else dropped
    for name, array in model.items():
        source_tensor = state[torchvision_name(name)]
        assert isinstance(array, np.ndarray) and array.dtype == np.float32
        assert array.shape == tuple(source_tensor.shape) and np.array_equal(array, source_tensor.numpy()), name


def test_shapes_follow_detectron2s_resnets():
    r18 = convert.to_detectron2(build_backbone('resnet18').state_dict())
    assert r18['stem.conv1.weight'].shape == (64, 3, 7, 7)
    assert r18['res5.0.shortcut.weight'].shape == (512, 256, 1, 1)
    assert r18['res2.1.conv2.norm.running_var'].shape == (64,)
    r50_backbone = build_backbone('resnet50')
    r50 = convert.to_detectron2(r50_backbone.state_dict())
    assert r50['res2.0.shortcut.weight'].shape == (256, 64, 1, 1)
    assert r50['res5.2.conv3.weight'].shape == (2048, 512, 1, 1)
    # torchvision strides in the 3x3 conv: detectron2 must be told so (STRIDE_IN_1X1=False).
    assert r50['res3.0.conv2.weight'].shape == (128, 128, 3, 3)
    assert r50_backbone.layer2[0].conv2.stride == (2, 2) and r50_backbone.layer2[0].conv1.stride == (1, 1)


def test_bad_inputs_are_clear_errors(tmp_path):
    backbone_file = tmp_path / 'student_backbone.pth'
    torch.save(build_backbone('resnet18').state_dict(), backbone_file)
    with pytest.raises(convert.ExportError, match='does not record its architecture: pass --arch'):
        convert.export(backbone_file, tmp_path / 'a.pkl')
    with pytest.raises(CheckpointError, match="'resnet34'"):  # strict load: not a partial export
        convert.export(backbone_file, tmp_path / 'b.pkl', 'resnet34')
    with pytest.raises(convert.ExportError, match="arch 'efficientnet_b0' has no detectron2 counterpart"):
        convert.export(backbone_file, tmp_path / 'c.pkl', 'efficientnet_b0')
    with pytest.raises(convert.ExportError, match="'fc.weight' is not a tensor of a torchvision ResNet"):
        convert.detectron2_name('fc.weight')
    assert sorted(os.listdir(tmp_path)) == ['student_backbone.pth']


def test_command_line(tmp_path, capsys):
    torch.save(build_backbone('resnet18').state_dict(), tmp_path / 'student_backbone.pth')
    convert.main([str(tmp_path / 'student_backbone.pth'), str(tmp_path / 'r18.pkl'), '--arch=resnet18'])
    written = len(detectron2_names('resnet18'))
    assert capsys.readouterr().out.strip() == f'wrote {written} tensors to {tmp_path / "r18.pkl"}'
