"""Semi-supervised evaluation: labelled subsets (lists and balanced draws), the fine-tuning and
linear protocols of main_lincls.py, their bad inputs, the results table and scripts/semi."""
import json
import os
import shutil
import subprocess
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from data.folder import ImageFolder
from data.transforms import eval_transform
from data.subsets import (LabelledSubset, SubsetError, balanced_subset, load_subset, read_subset_list,
                          write_subset_list)
from models import build_backbone
import main_lincls
from models.linear import LinearClassifier
from tests.multiprocess import fake_torchrun, flag_value, torchrun
from tests.helpers import REPO, TINY, outcomes as run_outcomes, render_shapes_tree, result_of, run
from tools import collect_results


@pytest.fixture(scope='module')
def data_dir(tiny_folder, tmp_path_factory):
    """tiny_folder (3 classes x 8 train, 4 val) with ImageNet-style unique file names <class>_<name>."""
    root = tmp_path_factory.mktemp('semi_data')
    for split in ('train', 'val'):
        for class_name in os.listdir(tiny_folder / split):
            os.makedirs(root / split / class_name)
            for name in os.listdir(tiny_folder / split / class_name):
                shutil.copy(tiny_folder / split / class_name / name,
                            root / split / class_name / f'{class_name}_{name}')
    return root


@pytest.fixture(scope='module')
def train_folder(data_dir):
    return ImageFolder(data_dir / 'train')


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A resnet18 backbone saved as a torchvision state dict, its BatchNorm statistics not the defaults
    (so that a changed statistic cannot be mistaken for a fresh one)."""
    torch.manual_seed(0)
    backbone = build_backbone('resnet18')
    with torch.no_grad():
        backbone.train()(torch.randn(4, 3, 32, 32))
    path = tmp_path_factory.mktemp('semi_pretrained') / 'backbone.pth'
    torch.save(backbone.state_dict(), path)
    return path


def write_lines(path, lines):
    path.write_text(''.join(f'{line}\n' for line in lines))
    return path


def test_list_selects_by_file_name_and_by_path(train_folder, tmp_path):
    chosen = [0, 9, 17]  # one image of each class
    rel = [train_folder.samples[i][0] for i in chosen]
    # SimCLR's lists name files alone; the lists this project writes name class/file.
    listed = write_lines(tmp_path / 'list.txt', [rel[2].split('/')[1], '', rel[0].split('/')[1], rel[1]])
    subset = load_subset(train_folder, listed)
    assert subset.indices == chosen and len(subset) == 3
    assert subset.targets == [0, 1, 2] and subset.classes == train_folder.classes
    image, target = subset[1]
    assert target == train_folder.targets[9] and image.size == train_folder.load(9).size


def test_bad_lists_are_rejected_with_counts_and_examples(train_folder, tmp_path):
    known = [rel.split('/')[1] for rel, _ in train_folder.samples[:2]]
    unknown = write_lines(tmp_path / 'unknown.txt', known + ['n0_1.JPEG', 'n0_2.JPEG', 'n0_3.JPEG'])
    with pytest.raises(SubsetError, match=r'3 of the 5 images listed in .*unknown\.txt are not in') as error:
        load_subset(train_folder, unknown)
    assert 'n0_1.JPEG' in str(error.value)
    with pytest.raises(SubsetError, match='more than once: ' + known[0]):
        read_subset_list(write_lines(tmp_path / 'twice.txt', known + known[:1]))
    with pytest.raises(SubsetError, match='names no images'):
        read_subset_list(write_lines(tmp_path / 'empty.txt', ['', ' ']))
    with pytest.raises(SubsetError, match='cannot read subset list'):
        read_subset_list(tmp_path / 'missing.txt')
    # The same file name in every class folder: a bare name is ambiguous, class/name is not.
    render_shapes_tree(tmp_path / 'shapes')
    shapes = ImageFolder(tmp_path / 'shapes' / 'train')
    with pytest.raises(SubsetError, match=r'1 file names listed in .* match several images') as error:
        load_subset(shapes, write_lines(tmp_path / 'shared.txt', ['00.png']))
    assert 'circle/00.png and square/00.png and triangle/00.png' in str(error.value)
    assert load_subset(shapes, write_lines(tmp_path / 'paths.txt', ['square/00.png'])).targets == [1]


def test_balanced_draw_is_class_balanced_reproducible_and_written_for_reuse(train_folder, tmp_path):
    drawn = balanced_subset(train_folder, 50, seed=3)
    assert Counter(train_folder.targets[i] for i in drawn) == {0: 4, 1: 4, 2: 4}  # 12 of 24
    assert drawn == sorted(set(drawn))
    assert balanced_subset(train_folder, 50, seed=3) == drawn
    assert balanced_subset(train_folder, 50, seed=4) != drawn
    assert Counter(train_folder.targets[i] for i in balanced_subset(train_folder, 1, seed=0)) == {0: 1, 1: 1, 2: 1}
    write_subset_list(tmp_path / 'subset.txt', LabelledSubset(train_folder, drawn))
    assert load_subset(train_folder, tmp_path / 'subset.txt').indices == drawn
    assert os.listdir(tmp_path) == ['subset.txt']  # no temporary file left behind
    with pytest.raises(SubsetError, match='between 0 and 100'):
        balanced_subset(train_folder, 0, seed=0)


def test_balanced_draw_rejects_a_class_too_small(data_dir, tmp_path):
    shutil.copytree(data_dir / 'train', tmp_path / 'train')
    small = tmp_path / 'train' / sorted(os.listdir(tmp_path / 'train'))[1]
    for name in sorted(os.listdir(small))[2:]:
        os.remove(small / name)
    folder = ImageFolder(tmp_path / 'train')  # 8 + 2 + 8 images: 50 % is 3 per class
    with pytest.raises(SubsetError, match=rf'needs 3 images of every class; too few in {small.name} \(2\)'):
        balanced_subset(folder, 50, seed=0)


def test_finetuning_updates_the_backbone_and_the_linear_protocol_does_not(data_dir):
    folder = ImageFolder(data_dir / 'train', eval_transform(32))
    images = torch.stack([folder[i][0] for i in (0, 9, 17)])
    targets = torch.tensor([0, 1, 2])
    for frozen, trains_backbone in ((False, True), (True, False)):  # fine-tuned, probe
        torch.manual_seed(0)
        model = LinearClassifier(build_backbone('resnet18'), num_classes=3, frozen=frozen)
        before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.train()
        assert model.backbone.bn1.training == trains_backbone
        F.cross_entropy(model(images), targets).backward()
        optimizer.step()
        after = model.state_dict()
        changed = {name for name in before if not torch.equal(before[name], after[name])}
        assert {'linear.weight', 'linear.bias'} <= changed
        backbone_changed = {name for name in changed if name.startswith('backbone.')}
        if trains_backbone:
            assert {'backbone.conv1.weight', 'backbone.layer4.1.conv2.weight',  # weights and BN statistics
                    'backbone.bn1.running_mean', 'backbone.layer4.1.bn2.running_var'} <= backbone_changed
        else:
            assert backbone_changed == set()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp('semi_runs')


@pytest.fixture(scope='module')
def outcomes(data_dir, train_folder, pretrained, runs, tmp_path_factory):
    """{case: outcome} of main_lincls runs in this process, in order."""
    tmp = tmp_path_factory.mktemp('semi_scratch')
    known = train_folder.samples[0][0].split('/')[1]
    bad_list = write_lines(tmp / 'bad.txt', [known, 'n01440764_10026.JPEG'])
    common = TINY + [f'--data_dir={data_dir}', f'--pretrained={pretrained}', '--batch_size=4']
    finetune, linear = runs / 'finetune_50', runs / 'linear_50'
    cases = {
        'finetune': ['--protocol=finetune', '--train_percent=50', '--seed=3', '--epochs=1',
                     '--backbone_lr=0.05', '--lr=0.5', f'--output_dir={finetune}'],
        # The list the finetune run wrote names the same 12 images.
        'linear': ['--protocol=linear', f'--train_subset={finetune / "train_subset.txt"}', '--epochs=1',
                   '--lr=0.5', f'--output_dir={linear}'],
        'evaluate finetune': ['--protocol=finetune', '--evaluate', f'--output_dir={finetune}'],
        'evaluate with the other protocol': ['--protocol=linear', '--evaluate', f'--output_dir={finetune}'],
        'resume on other images': ['--protocol=linear', '--train_percent=50', '--seed=4', '--epochs=2',
                                   '--resume=auto', f'--output_dir={linear}'],
        'list of unknown images': [f'--train_subset={bad_list}', f'--output_dir={tmp / "a"}'],
        'list and percent': [f'--train_subset={bad_list}', '--train_percent=10', f'--output_dir={tmp / "b"}'],
        'backbone lr of a probe': ['--backbone_lr=0.1', f'--output_dir={tmp / "c"}'],
        'knn on a subset': ['--eval=knn', '--train_percent=10', f'--output_dir={tmp / "d"}'],
    }
    return run_outcomes(main_lincls, {case: common + args for case, args in cases.items()})


def loaded_backbone(path):
    backbone = build_backbone('resnet18')
    backbone.load_state_dict(torch.load(path))
    return backbone


@pytest.mark.slow
def test_finetune_run_trains_the_whole_network_on_the_drawn_subset(outcomes, runs, pretrained, train_folder):
    result, out = result_of(outcomes, 'finetune'), runs / 'finetune_50'
    assert result['protocol'] == 'finetune' and result['train_images'] == 12 and result['labelled_percent'] == 50
    assert result['train_subset'] == str(out / 'train_subset.txt')
    drawn = balanced_subset(train_folder, 50, seed=3)
    assert read_subset_list(out / 'train_subset.txt') == [train_folder.samples[i][0] for i in drawn]
    assert json.load(open(out / 'result_semi.json'))['top1'] == result['top1']
    assert not os.path.exists(out / 'result_linear.json')  # not a row of the probe's table
    state = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert state['protocol'] == 'finetune' and 'linear' not in state
    start = torch.load(pretrained)
    backbone = {name.removeprefix('backbone.'): tensor for name, tensor in state['model'].items()
                if name.startswith('backbone.')}
    assert backbone.keys() == start.keys()
    changed = {name for name in start if not torch.equal(start[name], backbone[name])}
    assert {'conv1.weight', 'layer4.1.conv2.weight', 'bn1.running_mean', 'layer3.0.bn1.running_var'} <= changed
    lrs = [group['lr'] for group in state['optimizer']['param_groups']]
    assert lrs == pytest.approx([0.05, 0.5])  # backbone, classifier: epoch 0 of the cosine


@pytest.mark.slow
def test_linear_run_on_a_listed_subset_leaves_the_backbone_frozen(outcomes, runs, pretrained):
    result, out = result_of(outcomes, 'linear'), runs / 'linear_50'
    finetuned = result_of(outcomes, 'finetune')
    assert result['protocol'] == 'linear' and result['train_images'] == finetuned['train_images'] == 12
    assert result['train_subset'] == finetuned['train_subset']  # reused, not rewritten
    assert not os.path.exists(out / 'train_subset.txt')
    state = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert state['protocol'] == 'linear' and 'model' not in state and set(state['linear']) == {'weight', 'bias'}
    # The run checked after its first epoch that the backbone digest had not changed (it would have
    # stopped with a RuntimeError); the digest is that of the pretrained weights.
    assert state['backbone_digest'] == LinearClassifier(loaded_backbone(pretrained), 3).backbone_digest()


@pytest.mark.slow
def test_finetune_on_two_processes_trains_the_backbone(data_dir, pretrained, tmp_path):
    """The whole network under DistributedDataParallel (gloo), BatchNorm buffers included."""
    result = run(torchrun(2) + ['main_lincls.py'], TINY + [
        f'--data_dir={data_dir}', f'--pretrained={pretrained}', '--protocol=finetune', '--train_percent=50',
        '--batch_size=4', '--epochs=1', f'--output_dir={tmp_path}'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1])['train_images'] == 12
    trained = torch.load(tmp_path / 'checkpoint.pth', weights_only=False)['model']
    start = torch.load(pretrained)
    assert not torch.equal(trained['backbone.layer1.0.conv1.weight'], start['layer1.0.conv1.weight'])


@pytest.mark.slow
def test_saved_finetuned_network_evaluates_to_its_result(outcomes):
    trained, evaluated = result_of(outcomes, 'finetune'), result_of(outcomes, 'evaluate finetune')
    assert (evaluated['top1'], evaluated['top5'], evaluated['epochs']) == (trained['top1'], trained['top5'], 1)


@pytest.mark.slow
def test_bad_semi_supervised_inputs_are_clear_errors(outcomes):
    kind, message = outcomes['evaluate with the other protocol']
    assert kind == 'UsageError' and 'was trained with --protocol=finetune, not --protocol=linear' in message
    kind, message = outcomes['resume on other images']
    assert kind == 'UsageError' and 'other training images' in message
    kind, message = outcomes['list of unknown images']
    assert kind == 'SubsetError' and '1 of the 2 images listed in' in message and 'n01440764_10026.JPEG' in message
    kind, message = outcomes['list and percent']
    assert kind == 'UsageError' and '--train_subset and --train_percent' in message
    kind, message = outcomes['backbone lr of a probe']
    assert kind == 'UsageError' and '--backbone_lr applies to --protocol=finetune' in message
    kind, message = outcomes['knn on a subset']
    assert kind == 'UsageError' and '--train_percent' in message


@pytest.mark.slow
def test_collector_tables_semi_supervised_runs_beside_the_paper(outcomes, runs, capsys):
    finetuned, linear = result_of(outcomes, 'finetune'), result_of(outcomes, 'linear')
    collect_results.main([str(runs)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('Semi-supervised') and lines[2].startswith('| run | teacher | student | protocol |')
    rows = [[cell.strip() for cell in line.strip('|').split('|')] for line in lines[4:]]
    assert [row[3:] for row in rows] == [
        ['finetune', '50 %', '12', '1', f'{finetuned["top1"]:.1f}', f'{finetuned["top5"]:.1f}', '-'],
        ['linear', '50 %', '12', '1', f'{linear["top1"]:.1f}', f'{linear["top5"]:.1f}', '-']]


def test_collector_matches_spec_numbers_to_simclr_and_drawn_subsets():
    # SimCLR's lists: 12 811 and 128 116 of ImageNet's 1 281 167 training images; a balanced draw
    # of 1 % takes 13 of each of the 1000 classes.
    percent = {name: 100 * count / 1_281_167 for name, count in
               (('1 %', 12_811), ('10 %', 128_116), ('13 per class', 13_000))}
    assert [collect_results.labels_text(p) for p in percent.values()] == ['1 %', '10 %', '1.01 %']
    assert collect_results.paper_semi('SwAV R-50w2', 'resnet18', percent['1 %']) == 48.2
    assert collect_results.paper_semi('SwAV R-50w2', 'resnet18', percent['10 %']) == 60.2
    assert collect_results.paper_semi('R-152', 'resnet18', percent['13 per class']) == 50.3
    assert collect_results.paper_semi('MoCo v2 R-50 200 ep', 'resnet18', percent['10 %']) == 57.5
    assert collect_results.paper_semi('R-152', 'resnet18', 5.0) is None
    assert collect_results.paper_semi('R-152', 'resnet34', percent['1 %']) is None


def test_semi_scripts_run_both_protocols_on_both_simclr_lists(tmp_path):
    env, recorded = fake_torchrun(tmp_path)
    env.update(DATA='/d', SUBSETS='/lists')
    defined = set(main_lincls.FLAGS)
    for row, run_dir in (('r18_moco200', 'runs/r18_moco200'), ('r18_r152', 'runs/r18_r152'),
                         ('r18_swav_w2', 'runs/r18_swav_w2')):
        done = subprocess.run(['bash', f'scripts/semi/{row}.sh', '--workers=4'], cwd=REPO, env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        launches = recorded()
        assert [(flag_value(a, 'protocol'), flag_value(a, 'train_subset'), flag_value(a, 'output_dir')) for a in launches] == [
            ('finetune', '/lists/1percent.txt', f'{run_dir}/semi_1pct_finetune'),
            ('finetune', '/lists/10percent.txt', f'{run_dir}/semi_10pct_finetune'),
            ('linear', '/lists/1percent.txt', f'{run_dir}/semi_1pct_linear'),
            ('linear', '/lists/10percent.txt', f'{run_dir}/semi_10pct_linear')]
        for launch in launches:
            assert flag_value(launch, 'pretrained') == f'{run_dir}/checkpoint.pth' and launch[-1] == '--workers=4'
            given = {arg[2:].split('=')[0] for arg in launch[launch.index('main_lincls.py') + 1:]}
            assert given <= defined, given - defined
