"""The embedded default's report: a results table per seed (terminal and <run_dir>/seed<S>/results.md),
their mean +- std over the seeds with the claims the demo exists to show and how many seeds each held
in (<run_dir>/results.md), and <run_dir>/bags.png.

    python tools/fashion_report.py --run_dir=runs/fashion_mnist --seeds=0,1,2 \
        --bags=runs/fashion_mnist_teachers/<key>/bags.npy --data_dir=datasets/fashion_mnist_400_1000
"""
import json
import os
import sys

import numpy as np
from absl import flags
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.folder import ImageFolder  # noqa: E402
from data.neighbours import load_neighbours, read_sidecar  # noqa: E402
from utils import errors  # noqa: E402
from utils.args import Args  # noqa: E402
from utils.atomic import write_atomic  # noqa: E402

FLAGS = flags.FlagValues()  # this script's own flags, read once in main() (utils/args.py)
flags.DEFINE_string('run_dir', None, 'Output folder of scripts/fashion_mnist.sh: one seed<S>/ per seed.',
                    flag_values=FLAGS)
flags.DEFINE_list('seeds', ['0'], 'The seeds to report.', flag_values=FLAGS)
flags.DEFINE_string('bags', None, 'The neighbour file (.npy) the BINGO students trained with.', flag_values=FLAGS)
flags.DEFINE_string('data_dir', None, 'The ImageFolder tree the runs used.', flag_values=FLAGS)
flags.DEFINE_integer('seconds', None, 'Wall time of the whole run, for the report.', flag_values=FLAGS)
flags.DEFINE_integer('anchors', 8, 'Rows of bags.png.', flag_values=FLAGS)
flags.mark_flags_as_required(['run_dir', 'bags', 'data_dir'], flag_values=FLAGS)

MODELS = (('teacher', 'teacher'), ('bingo', 'BINGO student'), ('seed', 'SEED student'), ('disco', 'DisCo student'),
          ('moco_alone', 'MoCo student alone'), ('random_init', 'student at random init'))
PEERS = ('seed', 'disco')  # evaluated when the script's PEERS trained them; every other network always
# What the demo exists to show (issue 16): (better, worse, protocol); a kNN claim is counted at each k.
CLAIMS = (('bingo', 'moco_alone', 'knn'), ('bingo', 'moco_alone', 'linear'), ('teacher', 'random_init', 'knn'),
          ('bingo', 'random_init', 'knn'))


def read_result(path):
    if not os.path.exists(path):
        raise errors.UserError(f'{path} is missing: that evaluation has not run (scripts/fashion_mnist.sh runs it)')
    with open(path) as f:
        return json.load(f)


def read_run(seed_dir):
    """{network: {'linear': result_linear.json, 'knn': result_knn.json}} of one seed's run: every
    network of MODELS, the peers where they were evaluated."""
    return {name: {protocol: read_result(os.path.join(seed_dir, 'eval', name, protocol, f'result_{protocol}.json'))
                   for protocol in ('linear', 'knn')}
            for name, _ in MODELS if name not in PEERS or os.path.isdir(os.path.join(seed_dir, 'eval', name))}


def columns(runs):
    """(protocol, k, title) of each column: the probe's top-1, then the kNN top-1 at each k that
    eval_knn.py evaluated (its result's by_k), smallest first."""
    ks = sorted(runs[0]['teacher']['knn']['by_k'], key=int)
    return [('linear', None, 'linear top-1')] + [('knn', k, f'kNN top-1 (k={k})') for k in ks]


def top1(result, k):
    return result['top1'] if k is None else result['by_k'][k]['top1']


def table(runs):
    """Markdown table, one row per network: each column's value, or its mean +- std over the seeds
    (n - 1 in the denominator) when there are several runs."""
    metrics = columns(runs)
    rows = ['| network | arch | training | ' + ' | '.join(title for _, _, title in metrics) + ' |',
            '|---' * (3 + len(metrics)) + '|']
    for name, label in MODELS:
        if name not in runs[0]:
            continue
        first = runs[0][name]['linear']
        epochs = first.get('distill_epochs')
        training = f'{first["method"]}, {epochs} epochs' if epochs else first.get('method', '')
        cells = []
        for protocol, k, _ in metrics:
            values = np.array([top1(run[name][protocol], k) for run in runs])
            cells.append(f'{values[0]:.2f}' if len(runs) == 1 else f'{values.mean():.2f} +- {values.std(ddof=1):.2f}')
        rows.append(f'| {label} | {first["arch"]} | {training} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def claims(runs):
    """Each claim of CLAIMS and in how many of the seeds it held."""
    labels, metrics = dict(MODELS), columns(runs)
    lines = []
    for better, worse, protocol in CLAIMS:
        for column_protocol, k, title in metrics:
            if column_protocol == protocol:
                held = sum(top1(run[better][protocol], k) > top1(run[worse][protocol], k) for run in runs)
                lines.append(f'- {labels[better]} > {labels[worse]}, {title}: {held} of {len(runs)} seeds')
    return '\n'.join(lines)


def bags_picture(folder, neighbours, path, anchors, scale=3, border=3):
    """Each row: an anchor, then its k neighbours framed green (same class) or red (other class)."""
    picks = np.linspace(0, len(folder) - 1, anchors).astype(int)
    cell = 28 * scale + 2 * border
    k = neighbours.shape[1]
    canvas = Image.new('RGB', ((k + 1) * cell + 12, anchors * cell), 'white')
    draw = ImageDraw.Draw(canvas)
    for row, anchor in enumerate(picks):
        for col, index in enumerate([anchor, *neighbours[anchor]]):
            x = col * cell + (12 if col else 0)
            colour = 'black' if col == 0 else (
                'green' if folder.targets[index] == folder.targets[anchor] else 'red')
            draw.rectangle((x, row * cell, x + cell - 1, (row + 1) * cell - 1), fill=colour)
            image = folder.load(index).resize((28 * scale, 28 * scale), Image.NEAREST)
            canvas.paste(image, (x + border, row * cell + border))
    write_atomic(path, lambda f: canvas.save(f, format='PNG'))


def write_report(path, text):
    write_atomic(path, lambda f: f.write(text.encode()))
    print(text, flush=True)


def run(args):
    """Write the report of the runs `args` names (this script's flags) and print it."""
    folder = ImageFolder(os.path.join(args.data_dir, 'train'))
    neighbours = load_neighbours(args.bags, len(folder), folder.fingerprint())
    precision = read_sidecar(args.bags)['bag_precision']
    bags_picture(folder, neighbours, os.path.join(args.run_dir, 'bags.png'), args.anchors)
    runs = []
    for seed in args.seeds:
        seed_dir = os.path.join(args.run_dir, f'seed{seed}')
        runs.append(read_run(seed_dir))
        write_atomic(os.path.join(seed_dir, 'results.md'),
                     lambda f: f.write(f'## Seed {seed}\n\n{table(runs[-1:])}\n'.encode()))
    timing = f' in {args.seconds // 60} min {args.seconds % 60} s' if args.seconds is not None else ''
    over = f'mean +- std over seeds {", ".join(args.seeds)}' if len(runs) > 1 else f'seed {args.seeds[0]}'
    write_report(os.path.join(args.run_dir, 'results.md'),
                 f'# BINGO on Fashion-MNIST ({len(folder)} training images{timing}; {over})\n\n'
                 f'{table(runs)}\n\n{claims(runs)}\n\n'
                 f'Bag precision (share of the teacher\'s k={neighbours.shape[1]} neighbours in their anchor\'s '
                 f'class): {precision:.3f}. Bags: bags.png (green: same class, red: other).\n')


def main(argv):
    del argv
    run(Args.from_flags(FLAGS))


if __name__ == '__main__':
    errors.run(main, FLAGS)
