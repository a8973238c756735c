"""Backbones, heads and checkpoint loading (CPU, tiny inputs).

Checkpoints are built with the released key layouts by renaming a freshly built model's
state dict, so loading them must reproduce that model's outputs exactly.
"""
import argparse

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from efficientnet_pytorch import EfficientNet

from models.backbones import ARCHS, CLASSIFIER_PREFIXES, build_backbone
from models.pretrained import CheckpointError, load_pretrained, read_pretrained
from models.heads import Embedder, build_student, moco_head, swav_head

FEATURE_DIMS = {'resnet18': 512, 'resnet34': 512, 'resnet50': 2048, 'resnet101': 2048,
                'resnet152': 2048, 'resnet50w2': 4096, 'resnet50w4': 8192, 'resnet50w5': 10240,
                'efficientnet_b0': 1280, 'mobilenet_v3_large': 960}
# Building these allocates 0.4-1.5 GB; their layout is checked on the meta device instead.
HUGE_ARCHS = ('resnet50w4', 'resnet50w5')


@pytest.fixture(scope='module')
def swav_w2():
    """A SwAV ResNet-50w2 embedder with non-trivial BatchNorm statistics (built once: 128M params)."""
    return _with_random_bn_stats(Embedder(build_backbone('resnet50w2'), swav_head(4096))).eval()


def _with_random_bn_stats(model):
    """Give every BatchNorm non-default running stats so eval outputs depend on them being loaded."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return model


def _assert_same_outputs(source, loaded, size=32):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(source.eval()(x), loaded.eval()(x))


def _renamed(state, prefix):
    return {prefix + k: v for k, v in state.items()}


# ---------------------------------------------------------------- backbones

@pytest.mark.parametrize('arch', [a for a in ARCHS if a not in HUGE_ARCHS + ('resnet50w2',)])
def test_backbone_gives_pooled_features(arch):
    model = build_backbone(arch).eval()
    assert model.feature_dim == FEATURE_DIMS[arch]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, FEATURE_DIMS[arch])
    assert not any(k.startswith(CLASSIFIER_PREFIXES) for k in model.state_dict())


@pytest.mark.parametrize('arch,widen', [('resnet50w2', 2), ('resnet50w4', 4), ('resnet50w5', 5)])
def test_swav_wide_resnet_widens_every_stage(arch, widen):
    # On the meta device modules have shapes but no storage, so even w5 (375M params) is cheap.
    with torch.device('meta'):
        wide = build_backbone(arch)
        base = build_backbone('resnet50')
        out = wide(torch.empty(2, 3, 64, 64))
    assert wide.feature_dim == FEATURE_DIMS[arch] and out.shape == (2, FEATURE_DIMS[arch])
    wide_state, base_state = wide.state_dict(), base.state_dict()
    assert list(wide_state) == list(base_state)  # torchvision's names, in torchvision's order
    for key, base_tensor in base_state.items():
        expected = list(base_tensor.shape)
        # Every channel count scales: conv (out, in, k, k) in both dims, BN (C,), except RGB input.
        for dim in range(min(2, len(expected))):
            if not (key == 'conv1.weight' and dim == 1):
                expected[dim] *= widen
        assert list(wide_state[key].shape) == expected, key
    assert wide.layer1[0].conv1.out_channels == 64 * widen
    assert wide.layer4[-1].conv3.out_channels == 2048 * widen


def test_swav_stem_pads_then_convolves(swav_w2):
    backbone = swav_w2.backbone
    conv1 = backbone.conv1
    assert (conv1.out_channels, conv1.kernel_size, conv1.stride, conv1.padding) == (128, (7, 7), (2, 2), (2, 2))
    assert isinstance(backbone.padding, nn.ConstantPad2d)
    assert backbone.padding.padding == (1, 1, 1, 1) and backbone.padding.value == 0.0
    seen = []
    handle = conv1.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, 64, 64))
    handle.remove()
    assert seen == [torch.Size([2, 3, 66, 66])]  # the 1-pixel pad runs before conv1
    assert out.shape == (2, 4096)


def test_unknown_arch_lists_choices():
    with pytest.raises(ValueError, match='resnet50w2.*mobilenet_v3_large'):
        build_backbone('resnet9000')


@pytest.mark.parametrize('arch', ['resnet18', 'resnet50', 'mobilenet_v3_large'])
def test_torchvision_weights_round_trip(arch):
    reference = getattr(torchvision.models, arch)(weights=None)
    backbone = build_backbone(arch)
    backbone.load_state_dict({k: v for k, v in reference.state_dict().items()
                              if not k.startswith(CLASSIFIER_PREFIXES)}, strict=True)
    result = getattr(torchvision.models, arch)(weights=None).load_state_dict(backbone.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith(CLASSIFIER_PREFIXES) for k in result.missing_keys)


# ---------------------------------------------------------------- EfficientNet-B0 as released

def _package_b0(seed=0):
    """efficientnet_pytorch's own EfficientNet-B0, the network the BINGO release vendored."""
    torch.manual_seed(seed)
    return EfficientNet.from_name('efficientnet-b0')


def _package_pooled(network, x):
    """The package network's pooled 1280-d feature, the input of its dropout and classifier."""
    return network._avg_pooling(network.extract_features(x)).flatten(start_dim=1)


def test_efficientnet_b0_is_the_package_network_without_its_classifier():
    reference = _package_b0()
    torch.manual_seed(0)
    backbone = build_backbone('efficientnet_b0')
    # The package's names, in its order, less the classifier; the package's initialisation (the
    # same seed gives the same tensors, so nothing re-initialises them afterwards).
    expected = {k: v for k, v in reference.state_dict().items() if not k.startswith('_fc.')}
    assert list(backbone.state_dict()) == list(expected)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in expected.items())
    # The same weights give the same pooled features, and the package's logits on top of them.
    _with_random_bn_stats(reference)
    backbone.load_state_dict(expected, strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), _package_pooled(reference.eval(), x))
        assert torch.equal(reference(x), reference._fc(backbone(x)))


def test_efficientnet_b0_dropout_sits_before_the_head_in_train_mode_only():
    reference = _package_b0()
    torch.manual_seed(0)
    student = build_student('efficientnet_b0')
    student.backbone.load_state_dict(reference.state_dict(), strict=False)
    x = torch.randn(4, 3, 64, 64)
    # Train mode: stochastic depth in the blocks, then Dropout(0.2) on the pooled feature. The same
    # seed draws the same masks, so the student is head(dropout(package's pooled feature)).
    torch.manual_seed(1)
    embedding = student.train()(x)
    torch.manual_seed(1)
    dropped = F.dropout(_package_pooled(reference.train(), x), p=0.2, training=True)
    assert (dropped == 0).any()
    torch.testing.assert_close(embedding, F.normalize(student.head(dropped), dim=1), rtol=0, atol=1e-6)
    # Eval mode: no dropout, no stochastic depth; the same output every time.
    student.eval()
    reference.eval()
    with torch.no_grad():
        features = student.backbone(x)
        assert torch.equal(features, student.backbone(x))
        assert torch.equal(features, _package_pooled(reference, x)) and (features != 0).all()


def test_efficientnet_b0_batch_norm_and_same_padding_are_the_packages():
    backbone = build_backbone('efficientnet_b0')
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    # momentum 1 - 0.99 (TensorFlow's convention turned into PyTorch's), exactly as the package computes it
    assert len(norms) == 49 and all(m.momentum == 1 - 0.99 and m.eps == 1e-3 for m in norms)
    assert norms[0].momentum == pytest.approx(0.01)
    # TensorFlow "SAME" for a stride-2 3x3 stem on 224 px: one pixel right and bottom, none left or top.
    assert backbone._conv_stem.padding == (0, 0)
    assert backbone._conv_stem.static_padding.padding == (0, 1, 0, 1)
    assert backbone.feature_dim == 1280 and backbone._dropout.p == 0.2


def test_efficientnet_b0_package_state_dict_loads_as_a_plain_backbone(tmp_path):
    reference = _with_random_bn_stats(_package_b0())
    path = tmp_path / 'efficientnet-b0.pth'
    torch.save(reference.state_dict(), path)  # with the package's classifier _fc
    assert read_pretrained(str(path)).fmt == 'torchvision'
    backbone = load_pretrained('efficientnet_b0', str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x), _package_pooled(reference.eval(), x))


# ---------------------------------------------------------------- heads

def test_head_layouts():
    assert set(moco_head(512).state_dict()) == {'0.weight', '0.bias', '2.weight', '2.bias'}
    assert set(swav_head(512, 64).state_dict()) == {
        '0.weight', '0.bias', '1.weight', '1.bias', '1.running_mean', '1.running_var',
        '1.num_batches_tracked', '3.weight', '3.bias'}
    assert moco_head(512, 64, 16)[2].weight.shape == (16, 64)


def test_student_embeds_on_the_unit_sphere():
    student = build_student('resnet18', hidden_dim=64, out_dim=16)
    assert student.head[0].in_features == 512
    out = student(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 16)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))


# ---------------------------------------------------------------- checkpoints: released layouts

def test_moco_v2_checkpoint(tmp_path):
    source = _with_random_bn_stats(Embedder(build_backbone('resnet50'), moco_head(2048)))
    encoder = {**source.backbone.state_dict(), **_renamed(source.head.state_dict(), 'fc.')}
    state = {**_renamed(encoder, 'module.encoder_q.'),
             # The key encoder shares tensors with the query encoder here only to keep the file small.
             **_renamed(encoder, 'module.encoder_k.'),
             'module.queue': torch.randn(128, 64), 'module.queue_ptr': torch.zeros(1, dtype=torch.long)}
    assert state['module.encoder_q.fc.0.weight'].shape == (2048, 2048)
    assert state['module.encoder_q.fc.2.weight'].shape == (128, 2048)
    path = tmp_path / 'moco_v2_200ep_pretrain.pth.tar'
    torch.save({'state_dict': state, 'arch': 'resnet50', 'epoch': 200,
                'optimizer': {'state': {}, 'param_groups': [{'lr': 0.03, 'momentum': 0.9, 'params': [0]}]}},
               path)

    weights = read_pretrained(str(path))
    assert (weights.fmt, weights.head_kind, weights.arch) == ('moco', 'moco', 'resnet50')
    teacher = load_pretrained('resnet50', str(path), with_head=True)
    assert [m.out_features for m in teacher.head if isinstance(m, nn.Linear)] == [2048, 128]
    _assert_same_outputs(source, teacher)


def test_moco_v1_linear_head(tmp_path):
    source = Embedder(build_backbone('resnet18'), nn.Linear(512, 128))
    encoder = {**source.backbone.state_dict(), **_renamed(source.head.state_dict(), 'fc.')}
    path = tmp_path / 'moco_v1.pth.tar'
    torch.save({'state_dict': _renamed(encoder, 'module.encoder_q.'), 'arch': 'resnet18'}, path)

    weights = read_pretrained(str(path))
    assert weights.head_kind == 'linear' and set(weights.head) == {'weight', 'bias'}
    teacher = load_pretrained('resnet18', str(path), fmt='moco', with_head=True)
    assert isinstance(teacher.head, nn.Linear)
    _assert_same_outputs(source, teacher)


def test_swav_w2_checkpoint(tmp_path, swav_w2):
    state = {**_renamed(swav_w2.backbone.state_dict(), 'module.'),
             **_renamed(swav_w2.head.state_dict(), 'module.projection_head.'),
             'module.prototypes.weight': torch.randn(3000, 128)}
    assert state['module.conv1.weight'].shape == (128, 3, 7, 7)
    assert state['module.projection_head.0.weight'].shape == (8192, 4096)
    assert state['module.projection_head.3.weight'].shape == (128, 8192)
    path = tmp_path / 'swav_RN50w2_400ep_pretrain.pth.tar'
    torch.save(state, path)

    weights = read_pretrained(str(path))
    assert (weights.fmt, weights.head_kind) == ('swav', 'swav')
    assert not any('prototypes' in k for k in weights.backbone)
    teacher = load_pretrained('resnet50w2', str(path), with_head=True)
    assert isinstance(teacher.head[1], nn.BatchNorm1d) and teacher.head[1].num_features == 8192
    _assert_same_outputs(swav_w2, teacher, size=64)


def test_torchvision_checkpoint(tmp_path):
    reference = _with_random_bn_stats(torchvision.models.resnet50(weights=None))
    path = tmp_path / 'resnet50-0676ba61.pth'
    torch.save(reference.state_dict(), path)

    assert read_pretrained(str(path)).fmt == 'torchvision'
    backbone = load_pretrained('resnet50', str(path))
    reference.fc = nn.Identity()
    _assert_same_outputs(reference, backbone)
    # A bare backbone (torchvision, DINO, Barlow Twins releases) is a teacher of stage 1 only.
    with pytest.raises(CheckpointError, match='no projection head.*serves stage 1, knn_extract.py, only'):
        load_pretrained('resnet50', str(path), with_head=True)


def test_torchvision_checkpoint_with_ddp_prefix(tmp_path):
    reference = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / 'mobilenet.pth'
    torch.save(_renamed(reference.state_dict(), 'module.'), path)
    backbone = load_pretrained('mobilenet_v3_large', str(path))
    reference.classifier = nn.Identity()
    _assert_same_outputs(reference, backbone)


def test_bingo_checkpoint(tmp_path):
    student = _with_random_bn_stats(build_student('resnet18'))
    path = tmp_path / 'checkpoint_0199.pth.tar'
    # Our checkpoints may carry Python objects the safe unpickler refuses (here a Namespace).
    torch.save({'student': student.state_dict(), 'arch': 'resnet18',
                'args': argparse.Namespace(lr=0.03)}, path)

    weights = read_pretrained(str(path))
    assert (weights.fmt, weights.head_kind, weights.arch) == ('bingo', 'moco', 'resnet18')
    teacher = load_pretrained('resnet18', str(path), with_head=True)
    _assert_same_outputs(student, teacher)
    _assert_same_outputs(student.backbone, load_pretrained('resnet18', str(path), fmt='bingo'))


# ---------------------------------------------------------------- checkpoints: errors

def test_wrong_arch_names_file_format_and_keys(tmp_path):
    path = tmp_path / 'resnet18-f37072fd.pth'
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(CheckpointError) as error:
        load_pretrained('resnet50', str(path))
    message = str(error.value)
    assert str(path) in message and "'torchvision'" in message and "'resnet50'" in message
    assert 'layer1.0.conv3.weight' in message  # missing: resnet18 has no third conv
    assert 'shape mismatch' in message


def test_wrong_arch_mentions_recorded_arch(tmp_path):
    path = tmp_path / 'student.pth'
    torch.save({'student': build_student('resnet18').state_dict(), 'arch': 'resnet18'}, path)
    with pytest.raises(CheckpointError, match=r"records arch 'resnet18'.*missing keys: layer1\.2\."):
        load_pretrained('resnet34', str(path), with_head=True)


def test_shape_mismatch_is_reported(tmp_path):
    state = build_backbone('resnet18').state_dict()
    state['bn1.weight'] = torch.ones(65)
    path = tmp_path / 'broken.pth'
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r'shape mismatch.*bn1\.weight \(65,\) vs \(64,\)'):
        load_pretrained('resnet18', str(path))


@pytest.mark.parametrize('content', [{'foo': 1, 'bar': 'baz'}, {'foo.weight': torch.ones(2)}, [1, 2]])
def test_unrecognised_checkpoint_names_file(tmp_path, content):
    path = tmp_path / 'mystery.pth'
    torch.save(content, path)
    with pytest.raises(CheckpointError, match='mystery.pth'):
        read_pretrained(str(path))


def test_explicit_format_must_match(tmp_path):
    path = tmp_path / 'resnet18.pth'
    torch.save(build_backbone('resnet18').state_dict(), path)
    with pytest.raises(CheckpointError, match=r"resnet18\.pth is not in format 'moco'"):
        read_pretrained(str(path), fmt='moco')
    with pytest.raises(CheckpointError, match='unknown checkpoint format'):
        read_pretrained(str(path), fmt='simclr')


def test_missing_or_unreadable_file(tmp_path):
    with pytest.raises(CheckpointError, match='nowhere.pth does not exist'):
        load_pretrained('resnet18', str(tmp_path / 'nowhere.pth'), with_head=True)
    garbage = tmp_path / 'garbage.pth'
    garbage.write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='garbage.pth is truncated or not a checkpoint'):
        read_pretrained(str(garbage))
