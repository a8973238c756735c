"""Stage 3: the frozen linear probe, the kNN vote, main_lincls.py and eval_knn.py end to end on 1
and 2 processes, their bad inputs, and the results table."""
import copy
import json
import math
import os
import shutil
import pytest
import torch
import torch.nn.functional as F

from data.folder import ImageFolder
from data.transforms import eval_transform
from models import build_backbone, load_pretrained
import eval_knn
import main_distill
import main_lincls
from models.linear import LinearClassifier
from tests.helpers import TINY, outcomes as run_outcomes, parse, result_of, run
from tests.multiprocess import torchrun
from tools import collect_results
from utils.features import gather_by_index
from utils.knn_classifier import knn_classify, knn_vote, rank_classes

def split_tensors(root, split):
    folder = ImageFolder(os.path.join(root, split), eval_transform(32))
    return torch.stack([folder[i][0] for i in range(len(folder))]), torch.tensor(folder.targets)


@pytest.fixture(scope='module')
def data_dir(tiny_folder, tmp_path_factory):
    """tiny_folder (3 classes x 8 train) with one val image fewer: 11, so 2 ranks need padding."""
    root = tmp_path_factory.mktemp('lincls_data')
    shutil.copytree(tiny_folder, root, dirs_exist_ok=True)
    last_class = sorted(os.listdir(root / 'val'))[-1]
    os.remove(root / 'val' / last_class / sorted(os.listdir(root / 'val' / last_class))[-1])
    return root


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """Where finished runs go, for the collector."""
    return tmp_path_factory.mktemp('runs')


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
    """Everything else: bad inputs, runs the collector should not see."""
    return tmp_path_factory.mktemp('lincls_scratch')


@pytest.fixture(scope='module')
def moco_run(data_dir, runs):
    """A resnet18 trained for 3 CPU steps of main_distill.py --method=moco."""
    out = runs / 'r18_moco_alone'
    main_distill.run(parse(main_distill, TINY + [
        '--method=moco', f'--data_dir={data_dir}', f'--output_dir={out}', '--arch=resnet18',
        '--batch_size=8', '--queue_size=16', '--epochs=1']))
    return out


def evaluate_args(data_dir, moco_run):
    """--evaluate the saved probe with the exported torchvision-layout backbone: the same tensors
    as the distillation checkpoint's student, so the probe's backbone digest accepts them."""
    return TINY + [f'--data_dir={data_dir}', f'--pretrained={moco_run / "student_backbone.pth"}',
                   '--pretrained_format=torchvision', f'--output_dir={moco_run / "lincls"}', '--evaluate',
                   '--batch_size=4']


@pytest.fixture(scope='module')
def outcomes(data_dir, moco_run, scratch):
    """{case: outcome} of main_lincls runs on one process, in order: train the probe, evaluate it,
    then the bad inputs; and of eval_knn, 'knn'."""
    tmp = scratch
    no_student = tmp / 'no_student.pth'
    torch.save({'arch': 'resnet18', 'method': 'bingo', 'epoch': 1, 'flags': {}}, no_student)
    other_backbone = tmp / 'other_resnet18.pth'
    torch.save(build_backbone('resnet18').state_dict(), other_backbone)
    renamed = tmp / 'renamed'
    shutil.copytree(data_dir, renamed)
    os.rename(renamed / 'val' / sorted(os.listdir(renamed / 'val'))[0], renamed / 'val' / 'zebra')
    data, student = f'--data_dir={data_dir}', f'--pretrained={moco_run / "checkpoint.pth"}'
    cases = {
        'train': [data, student, f'--output_dir={moco_run / "lincls"}', '--batch_size=8', '--epochs=2',
                  '--lr=0.001', '--min_lr=0'],
        'evaluate': evaluate_args(data_dir, moco_run),
        # Epoch 0's lr is the base lr whatever --epochs, so this is the first epoch of 'train'.
        'validated once': [data, student, f'--output_dir={tmp / "once"}', '--batch_size=8', '--epochs=2',
                           '--lr=0.001', '--min_lr=0', '--val_freq=2'],
        'first epoch': [data, student, f'--output_dir={tmp / "resumed"}', '--batch_size=8', '--epochs=1',
                        '--lr=0.001', '--min_lr=0'],
        'resumed': [data, student, f'--output_dir={tmp / "resumed"}', '--batch_size=8', '--epochs=2',
                    '--lr=0.001', '--min_lr=0', '--resume=auto'],
        'no student weights': [data, f'--pretrained={no_student}', '--pretrained_format=bingo',
                               f'--output_dir={tmp / "a"}'],
        'other architecture': [data, student, '--arch=resnet34', f'--output_dir={tmp / "b"}'],
        'val classes differ': [f'--data_dir={renamed}', student, f'--output_dir={tmp / "c"}'],
        'no saved probe': [data, student, '--evaluate', f'--output_dir={tmp / "d"}'],
        'normalised otherwise': [*evaluate_args(data_dir, moco_run), '--normalise_features'],
        'probe of another backbone': [data, f'--pretrained={other_backbone}', '--evaluate',
                                      f'--output_dir={moco_run / "lincls"}'],
    }
    knn = {'knn': [data, student, f'--output_dir={moco_run / "knn"}', '--knn_k=5,10', '--knn_backend=torch',
                   '--batch_size=8']}
    return {**run_outcomes(main_lincls, {case: TINY + args for case, args in cases.items()}),
            **run_outcomes(eval_knn, {case: TINY + args for case, args in knn.items()})}


@pytest.mark.slow
def test_probe_of_a_few_moco_steps_learns_and_leaves_the_backbone_untouched(data_dir, moco_run):
    torch.manual_seed(0)
    probe = LinearClassifier(load_pretrained('resnet18', moco_run / 'checkpoint.pth'), num_classes=3)
    before = copy.deepcopy(probe.backbone.state_dict())
    digest = probe.backbone_digest()
    linear_before = probe.linear.weight.detach().clone()
    images, targets = split_tensors(data_dir, 'train')
    optimizer = torch.optim.SGD(probe.linear.parameters(), lr=1e-4, momentum=0.9)
    probe.train()
    for _ in range(30):
        loss = F.cross_entropy(probe(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert not probe.backbone.training and probe.linear.training
    after = probe.backbone.state_dict()
    assert any('running_mean' in name for name in before)
    assert all(torch.equal(before[name], after[name]) for name in before)  # weights and BN statistics
    assert probe.backbone_digest() == digest
    assert not torch.equal(probe.linear.weight, linear_before)
    val_images, val_targets = split_tensors(data_dir, 'val')
    with torch.no_grad():
        accuracy = (probe.eval()(val_images).argmax(dim=1) == val_targets).float().mean()
    assert accuracy > 0.6  # chance: 1/3


def test_normalised_probe_sees_unit_features_whatever_their_scale():
    torch.manual_seed(0)
    backbone = build_backbone('resnet18')
    images = torch.randn(4, 3, 32, 32)
    plain, normalised = LinearClassifier(backbone, 3), LinearClassifier(backbone, 3, normalise=True)
    with torch.no_grad():
        raw, unit = plain.features(images), normalised.features(images)
        assert torch.allclose(unit.norm(dim=1), torch.ones(4), atol=1e-6)
        assert torch.allclose(unit, raw / raw.norm(dim=1, keepdim=True), atol=1e-6)
        assert raw.norm(dim=1).min() > 10  # an untrained network's scale, the reason for the option


def test_digest_names_a_changed_buffer():
    probe = LinearClassifier(build_backbone('resnet18'), num_classes=2)
    digest = probe.backbone_digest()
    probe.backbone.layer1[0].bn1.running_var[0] += 1e-3
    changed = [name for name, value in probe.backbone_digest().items() if digest[name] != value]
    assert changed == ['layer1.0.bn1.running_var']


def test_knn_vote_matches_a_hand_computation():
    t = 0.07
    similarities = torch.tensor([[0.9, 0.8, 0.8, 0.1], [0.5, 0.5, 0.3, 0.3]])
    labels = torch.tensor([[2, 0, 1, 0], [1, 0, 2, 2]])
    e = lambda s: math.exp(s / t)  # noqa: E731
    hand = torch.tensor([[e(0.8) + e(0.1), e(0.8), e(0.9)],
                         [e(0.5), e(0.5), 2 * e(0.3)]], dtype=torch.float64)
    votes = knn_vote(similarities, labels, num_classes=3, temperature=t).double()
    # Equal up to a positive factor per query (votes are computed relative to the top similarity).
    torch.testing.assert_close(votes / votes.sum(1, keepdim=True), hand / hand.sum(1, keepdim=True))
    # Query 0: class 2 wins. Query 1: classes 0 and 1 tie exactly -> the lower index first.
    assert rank_classes(votes).tolist() == [[2, 0, 1], [0, 1, 2]]


def test_knn_classify_searches_and_breaks_ties_by_class_index():
    angle = 0.3
    database = torch.tensor([[math.cos(angle), math.sin(angle)], [math.cos(angle), -math.sin(angle)],
                             [-1.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([2, 1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    ranked = knn_classify(database, labels, query, ks=[2, 4], num_classes=3, backend='torch')
    assert ranked[2][0].tolist() == [1, 2, 0]  # two equally similar neighbours: class 1 before 2
    # k=4 adds cos 90deg and cos 180deg for class 0: still below one exp(cos 0.3 / T).
    assert ranked[4][0].tolist() == [1, 2, 0]


def test_gather_by_index_drops_padding_and_checks_coverage():
    rows = torch.tensor([10., 11., 12., 10.])  # the sampler repeated index 0 as padding
    assert gather_by_index(rows, [0, 1, 2, 0], 3).tolist() == [10., 11., 12.]
    with pytest.raises(RuntimeError, match='missing'):
        gather_by_index(rows, [0, 1, 1, 0], 3)


@pytest.mark.slow
def test_linear_run_writes_checkpoints_metrics_and_result(outcomes, moco_run):
    result, out = result_of(outcomes, 'train'), moco_run / 'lincls'
    assert set(result) == {'top1', 'top5', 'best_top1', 'epochs'} and result['epochs'] == 2
    assert 0 <= result['top1'] <= result['best_top1'] <= 100 and result['top1'] <= result['top5']
    saved = json.load(open(out / 'result_linear.json'))
    assert saved['top1'] == result['top1'] and saved['method'] == 'moco' and saved['arch'] == 'resnet18'
    records = [json.loads(line) for line in open(out / 'metrics.jsonl')]
    assert [r['epoch'] for r in records if r.get('phase') == 'val'] == [0, 1]
    assert any('loss' in r and 'eta_s' in r for r in records)
    state = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert state['epoch'] == 2 and set(state['linear']) == {'weight', 'bias'}
    assert os.path.exists(out / 'checkpoint_best.pth')


@pytest.mark.slow
def test_resumed_run_ends_where_the_uninterrupted_one_does(outcomes, moco_run, scratch):
    assert result_of(outcomes, 'first epoch')['epochs'] == 1
    assert result_of(outcomes, 'resumed') == result_of(outcomes, 'train')
    resumed = torch.load(scratch / 'resumed' / 'checkpoint.pth', weights_only=False)
    uninterrupted = torch.load(moco_run / 'lincls' / 'checkpoint.pth', weights_only=False)
    assert all(torch.equal(resumed['linear'][k], uninterrupted['linear'][k]) for k in ('weight', 'bias'))


@pytest.mark.slow
def test_val_freq_validates_less_and_ends_with_the_same_probe(outcomes, scratch):
    once, every = result_of(outcomes, 'validated once'), result_of(outcomes, 'train')
    assert (once['top1'], once['top5']) == (every['top1'], every['top5'])  # validating draws no training data
    records = [json.loads(line) for line in open(scratch / 'once' / 'metrics.jsonl')]
    assert [r['epoch'] for r in records if r.get('phase') == 'val'] == [1]  # the last epoch's alone


@pytest.mark.slow
def test_evaluate_on_one_and_two_processes_counts_the_same(data_dir, moco_run, outcomes):
    trained, one = result_of(outcomes, 'train'), result_of(outcomes, 'evaluate')
    result = run(torchrun(2) + ['main_lincls.py'], evaluate_args(data_dir, moco_run))
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads(result.stdout.splitlines()[-1])
    # 11 val images: each of the 2 ranks gets 6, one of them a padded repeat.
    assert (one['top1'], one['top5']) == (two['top1'], two['top5']) == (trained['top1'], trained['top5'])
    assert one['epochs'] == two['epochs'] == 2


@pytest.mark.slow
def test_knn_mode_matches_a_direct_computation(data_dir, moco_run, outcomes):
    result = result_of(outcomes, 'knn')
    backbone = load_pretrained('resnet18', moco_run / 'checkpoint.pth').eval()
    train_images, train_targets = split_tensors(data_dir, 'train')
    val_images, val_targets = split_tensors(data_dir, 'val')
    with torch.no_grad():
        database, queries = (F.normalize(backbone(x), dim=1) for x in (train_images, val_images))
    for k in (5, 10):
        similarities, neighbours = (queries @ database.T).topk(k, dim=1)
        correct = 0
        for q in range(len(queries)):
            votes = [0.0] * 3
            for s, n in zip(similarities[q].tolist(), neighbours[q].tolist()):
                votes[int(train_targets[n])] += math.exp(s / 0.07)
            correct += votes.index(max(votes)) == int(val_targets[q])  # index(): lowest class on ties
        assert result['by_k'][str(k)]['top1'] == pytest.approx(100 * correct / len(queries))
    assert result['top1'] == result['by_k']['5']['top1'] and result['k'] == 5
    assert json.load(open(moco_run / 'knn' / 'result_knn.json'))['method'] == 'moco'


@pytest.mark.slow
def test_main_lincls_eval_knn_still_runs_the_knn_evaluation_with_a_deprecation_message(data_dir, moco_run, outcomes,
                                                                                       capsys):
    argv = TINY + [f'--data_dir={data_dir}', f'--pretrained={moco_run / "checkpoint.pth"}', '--eval=knn',
                   f'--output_dir={moco_run / "knn_deprecated"}', '--knn_k=5,10', '--knn_backend=torch',
                   '--batch_size=8']
    assert main_lincls.run(parse(main_lincls, argv)) == result_of(outcomes, 'knn')
    assert 'main_lincls.py: --eval=knn is deprecated: run eval_knn.py' in capsys.readouterr().err


@pytest.mark.slow
def test_collector_tables_finished_runs_beside_the_paper(outcomes, runs, capsys):
    linear, knn = result_of(outcomes, 'train'), result_of(outcomes, 'knn')
    collect_results.main([str(runs)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith('| run | teacher | student |') and len(table) == 3
    row = [cell.strip() for cell in table[2].strip('|').split('|')]
    assert row[1:] == ['MoCo v2 student alone', 'resnet18', '1', '2', f'{linear["top1"]:.1f}',
                       f'{linear["top5"]:.1f}', f'{knn["top1"]:.1f} (k=5)', '52.5 / 77.0']


def test_collector_names_spec_teachers():
    def label(teacher_arch, teacher):
        return collect_results.teacher_label({'method': 'bingo', 'teacher_arch': teacher_arch, 'teacher': teacher})
    assert label('resnet50', 'moco_v2_200ep_pretrain.pth.tar') == 'MoCo v2 R-50 200 ep'
    assert label('resnet50', 'moco_v2_800ep_pretrain.pth.tar') == 'MoCo v2 R-50 800 ep'
    assert label('resnet50', 'swav_800ep_pretrain.pth.tar') == 'resnet50 (swav_800ep_pretrain.pth.tar)'
    assert label('resnet152', 'r152.pth') == 'R-152'
    assert label('resnet50w2', 'swav_RN50w2_400ep_pretrain.pth.tar') == 'SwAV R-50w2'
    assert collect_results.teacher_label({}) == '-'  # the --pretrained file itself, e.g. a teacher


@pytest.mark.slow
def test_bad_inputs_are_clear_errors(outcomes):
    kind, message = outcomes['no student weights']
    assert kind == 'CheckpointError' and 'no_student.pth' in message and "'bingo'" in message
    kind, message = outcomes['other architecture']
    assert kind == 'CheckpointError' and "'resnet34'" in message and "'resnet18'" in message
    kind, message = outcomes['val classes differ']
    assert kind == 'DataError' and 'zebra' in message
    kind, message = outcomes['no saved probe']
    assert kind == 'UsageError' and '--evaluate needs a saved probe' in message
    kind, message = outcomes['probe of another backbone']
    assert kind == 'UsageError' and 'not the backbone the probe' in message
    kind, message = outcomes['normalised otherwise']
    assert kind == 'UsageError' and 'was trained with --normalise_features=False' in message
