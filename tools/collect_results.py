"""Markdown tables of every finished linear-probe, kNN and semi-supervised run, beside the paper.

    python tools/collect_results.py runs/

Finds the result_linear.json, result_knn.json and result_semi.json files main_lincls.py writes
at the end of a run, anywhere below the given folders. Linear and kNN results of the same
--pretrained checkpoint share a row of the first table; semi-supervised results (a labelled
subset, or fine-tuning) get a row per checkpoint, protocol and share of labels in a second one.
Where the same thing was evaluated more than once, the newest file wins.
"""
import argparse
import json
import os
import re

RESULT_FILES = {'linear': 'result_linear.json', 'knn': 'result_knn.json'}
SEMI_FILE = 'result_semi.json'
PEERS = {'seed': 'SEED', 'disco': 'DisCo'}  # main_distill --method: the name on the paper's table

# SPEC.md: ImageNet-1k linear top-1 / top-5 (%) after 200 distillation epochs; None = not reported.
PAPER = {
    ('MoCo v2 student alone', 'resnet18'): (52.5, 77.0),
    ('MoCo v2 student alone', 'resnet34'): (57.4, 81.6),
    ('MoCo v2 R-50 200 ep', 'resnet18'): (61.4, 84.3),
    ('MoCo v2 R-50 200 ep', 'resnet34'): (63.5, 85.7),
    ('MoCo v2 R-50 800 ep', 'resnet18'): (64.0, 85.7),
    ('MoCo v2 R-50 800 ep', 'resnet34'): (66.1, 87.2),
    ('R-152', 'resnet18'): (65.9, 87.1),
    ('R-152', 'resnet34'): (69.1, 88.9),
    # The peers on BINGO's table (SPEC: ResNet-18 only, top-1); no ResNet-34 number found (docs/peers.md).
    ('SEED, SwAV R-50w2', 'resnet18'): (63.0, None),
    ('DisCo, SwAV R-50w2', 'resnet18'): (65.2, None),
    ('SwAV R-50w2', 'resnet18'): (65.5, 87.0),
    ('SwAV R-50w2', 'resnet34'): (68.9, 89.0),
    ('SwAV R-50w2', 'efficientnet_b0'): (69.3, None),
    ('SwAV R-50w2', 'mobilenet_v3_large'): (67.1, None),
}
# SPEC.md: ResNet-18 fine-tuned on 1 % / 10 % of the ImageNet labels (SimCLR's subsets), top-1 (%).
PAPER_SEMI = {
    ('MoCo v2 R-50 200 ep', 'resnet18'): {1: 42.8, 10: 57.5},
    ('R-152', 'resnet18'): {1: 50.3, 10: 61.2},
    ('SwAV R-50w2', 'resnet18'): {1: 48.2, 10: 60.2},
}
TEACHER_ORDER = list(dict.fromkeys(teacher for teacher, _ in PAPER))
COLUMNS = ('run', 'teacher', 'student', 'distill epochs', 'linear epochs', 'linear top-1',
           'linear top-5', 'kNN top-1', 'paper top-1 / top-5')
SEMI_COLUMNS = ('run', 'teacher', 'student', 'protocol', 'labels', 'train images', 'epochs', 'top-1',
                'top-5', 'paper top-1 (fine-tuned)')


class ResultError(ValueError):
    """A result file that cannot be read as main_lincls.py writes it."""


def teacher_label(result):
    """The teacher as SPEC's table names it, from the distillation run's record in the result; the
    peers' runs (SEED, DisCo) are named by method and teacher, e.g. 'SEED, SwAV R-50w2'.

    A result without a distillation record probed the --pretrained file itself (e.g. a teacher).
    """
    method = result.get('method')
    if method == 'moco':
        return 'MoCo v2 student alone'
    if method != 'bingo' and method not in PEERS:
        return '-'
    teacher = _teacher_name(result.get('teacher_arch'), result.get('teacher') or '')
    return f'{PEERS[method]}, {teacher}' if method in PEERS else teacher


def _teacher_name(arch, name):
    if arch == 'resnet50w2':
        return 'SwAV R-50w2'
    if arch == 'resnet152':
        return 'R-152'
    epochs = re.search(r'(\d+)ep', name)
    if arch == 'resnet50' and 'moco' in name.lower() and epochs and epochs.group(1) in ('200', '800'):
        return f'MoCo v2 R-50 {epochs.group(1)} ep'
    return f'{arch} ({name})'


def read_result(path, required=('top1', 'top5', 'arch', 'pretrained')):
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ResultError(f'cannot read result file {path}: {e}') from e
    missing = [key for key in required if key not in result]
    if missing:
        raise ResultError(f'result file {path} lacks {", ".join(missing)}; was it written by main_lincls.py?')
    return result


def collect(roots):
    """{pretrained path: {'linear': result, 'knn': result}}, the newest file of each kind."""
    found = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            for kind, name in RESULT_FILES.items():
                if name not in files:
                    continue
                path = os.path.join(folder, name)
                result = read_result(path)
                runs = found.setdefault(result['pretrained'], {})
                mtime = os.path.getmtime(path)
                if kind not in runs or mtime > runs[kind][0]:
                    runs[kind] = (mtime, result)
    return {pretrained: {kind: result for kind, (_, result) in runs.items()}
            for pretrained, runs in found.items()}


def collect_semi(roots):
    """{(pretrained, protocol, labels): result}, the newest result_semi.json of each."""
    found = {}
    for root in roots:
        for folder, _, files in os.walk(root):
            if SEMI_FILE not in files:
                continue
            path = os.path.join(folder, SEMI_FILE)
            result = read_result(path, ('top1', 'top5', 'arch', 'pretrained', 'protocol', 'labelled_percent'))
            key = (result['pretrained'], result['protocol'], labels_text(result['labelled_percent']))
            mtime = os.path.getmtime(path)
            if key not in found or mtime > found[key][0]:
                found[key] = (mtime, result)
    return {key: result for key, (_, result) in found.items()}


def labels_text(percent):
    """'1 %' for SimCLR's 1 % list (12 811 of 1 281 167 images: 0.99996 %), '1.01 %' for 13 per class."""
    return f'{percent:.3g} %'


def paper_semi(teacher, student, percent):
    """SPEC's fine-tuned top-1 for the nearer of 1 % and 10 % labels, if within 10 % of it."""
    paper = PAPER_SEMI.get((teacher, student), {})
    share = min(paper, key=lambda p: abs(percent - p), default=None)
    return paper[share] if share is not None and abs(percent - share) <= 0.1 * share else None


def _number(value, digits=1):
    return '-' if value is None else f'{value:.{digits}f}'


def _shown_path(path, roots):
    """path relative to the searched folder holding it, else as recorded."""
    for root in roots:
        relative = os.path.relpath(path, os.path.abspath(root))
        if not relative.startswith(os.pardir):
            return relative
    return path


def table_rows(runs, roots):
    """One row of COLUMNS per checkpoint, in SPEC's table order, then the others by path."""
    rows = []
    for pretrained, results in runs.items():
        linear, knn = results.get('linear', {}), results.get('knn', {})
        info = linear or knn
        teacher, student = teacher_label(info), info['arch']
        paper = PAPER.get((teacher, student))
        paper_text = '-' if paper is None else f'{_number(paper[0])} / {_number(paper[1])}'
        knn_text = f'{_number(knn["top1"])} (k={knn["k"]})' if knn else '-'
        order = TEACHER_ORDER.index(teacher) if teacher in TEACHER_ORDER else len(TEACHER_ORDER)
        rows.append(((order, student, pretrained), [
            _shown_path(pretrained, roots), teacher, student, str(info.get('distill_epochs') or '-'),
            str(linear.get('epochs', '-')), _number(linear.get('top1')), _number(linear.get('top5')),
            knn_text, paper_text]))
    return [row for _, row in sorted(rows)]


def semi_rows(results, roots):
    """One row of SEMI_COLUMNS per (checkpoint, protocol, labels), in SPEC's teacher order, fewer
    labels first, fine-tuning before the linear protocol."""
    rows = []
    for (pretrained, protocol, labels), result in results.items():
        teacher, student = teacher_label(result), result['arch']
        order = TEACHER_ORDER.index(teacher) if teacher in TEACHER_ORDER else len(TEACHER_ORDER)
        rows.append(((order, student, pretrained, result['labelled_percent'], protocol != 'finetune'), [
            _shown_path(pretrained, roots), teacher, student, protocol, labels,
            str(result.get('train_images', '-')), str(result.get('epochs', '-')), _number(result['top1']),
            _number(result['top5']), _number(paper_semi(teacher, student, result['labelled_percent']))]))
    return [row for _, row in sorted(rows)]


def markdown(rows, columns=COLUMNS):
    lines = ['| ' + ' | '.join(columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('roots', nargs='*', default=['runs'], help='folders to search (default: runs)')
    args = parser.parse_args(argv)
    for root in args.roots:
        if not os.path.isdir(root):
            raise SystemExit(f'{root} is not a folder')
    runs, semi = collect(args.roots), collect_semi(args.roots)
    if not runs and not semi:
        names = ' or '.join((*RESULT_FILES.values(), SEMI_FILE))
        raise SystemExit(f'no {names} below {", ".join(args.roots)}')
    tables = []
    if runs:
        tables.append(markdown(table_rows(runs, args.roots)))
    if semi:
        tables.append('Semi-supervised: trained on a share of the training labels\n\n'
                      + markdown(semi_rows(semi, args.roots), SEMI_COLUMNS))
    print('\n\n'.join(tables))


if __name__ == '__main__':
    main()
