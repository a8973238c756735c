"""The embedded default's report: results table (terminal and results.md) and bags.png.

    python tools/fashion_report.py --run_dir=runs/fashion_mnist_seed0 --data_dir=datasets/fashion_mnist_500
"""
import json
import os
import sys

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.folder import ImageFolder  # noqa: E402
from data.neighbours import load_neighbours, read_sidecar  # noqa: E402
from utils.atomic import write_atomic  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('run_dir', None, 'Output folder of scripts/fashion_mnist.sh.')
flags.DEFINE_string('data_dir', None, 'The ImageFolder tree the run used.')
flags.DEFINE_integer('seconds', None, 'Wall time of the whole run, for the report.')
flags.DEFINE_integer('anchors', 8, 'Rows of bags.png.')
flags.mark_flags_as_required(['run_dir', 'data_dir'])

MODELS = (('teacher', 'teacher'), ('bingo', 'BINGO student'), ('moco_alone', 'MoCo v2 student alone'),
          ('random_init', 'student at random init'))


def read_result(path):
    with open(path) as f:
        return json.load(f)


def results_table(run_dir):
    """Markdown table: one row per evaluated network."""
    rows = ['| network | arch | training | linear top-1 | linear top-5 | kNN top-1 (k=20) |',
            '|---|---|---|---|---|---|']
    for name, label in MODELS:
        linear = read_result(os.path.join(run_dir, 'eval', name, 'linear', 'result_linear.json'))
        knn = read_result(os.path.join(run_dir, 'eval', name, 'knn', 'result_knn.json'))
        epochs = linear.get('distill_epochs')
        training = f'{linear["method"]}, {epochs} epochs' if epochs else linear.get('method', '')
        rows.append(f'| {label} | {linear["arch"]} | {training} | {linear["top1"]:.2f} | '
                    f'{linear["top5"]:.2f} | {knn["top1"]:.2f} |')
    return '\n'.join(rows)


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


def main(argv):
    del argv
    folder = ImageFolder(os.path.join(FLAGS.data_dir, 'train'))
    bags = os.path.join(FLAGS.run_dir, 'bags.npy')
    neighbours = load_neighbours(bags, len(folder), folder.fingerprint())
    precision = read_sidecar(bags)['bag_precision']
    bags_picture(folder, neighbours, os.path.join(FLAGS.run_dir, 'bags.png'), FLAGS.anchors)
    timing = f' in {FLAGS.seconds // 60} min {FLAGS.seconds % 60} s' if FLAGS.seconds is not None else ''
    report = (f'# BINGO on Fashion-MNIST ({len(folder)} training images{timing})\n\n'
              f'{results_table(FLAGS.run_dir)}\n\n'
              f'Bag precision (share of the teacher\'s k={neighbours.shape[1]} neighbours in their '
              f'anchor\'s class): {precision:.3f}. Bags: bags.png (green: same class, red: other).\n')
    write_atomic(os.path.join(FLAGS.run_dir, 'results.md'), lambda f: f.write(report.encode()))
    print(report, flush=True)


if __name__ == '__main__':
    app.run(main)
