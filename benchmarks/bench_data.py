"""Samples/s of the two stage-2 data pipelines (`--data_pipeline=cpu|gpu` of main_distill.py).

    python3 -m benchmarks.bench_data --workers=4,16 --train          # from the repository root
    python3 -m benchmarks.bench_data --device=cpu --num_images=512 --batch_size=16 --image_size=64 \
        --steps=6 --warmup_steps=2 --workers=1,2 --train --teacher_arch=resnet18 --queue_size=4096

Builds an ImageFolder of real ImageNet JPEGs: the 20 ImageNet photos (512 px, one
1024x683) that the PyPI wheel of foolbox ships in foolbox/data/imagenet_*.jpg, copied to
--num_images files over --num_classes classes. foolbox saved them as progressive JPEGs, while
ImageNet's own files are baseline, which nvJPEG decodes in hardware and progressive ones in
software one by one; --encoding=baseline (the default) re-encodes them once as baseline
quality 90, --encoding=original copies the bytes as shipped.

For each pipeline and worker count it times `--steps` batches after `--warmup_steps`:
- data: the loader plus what turns a batch into the four view tensors on the device
  (data.jpeg_bags.views_on_device, as main_distill.py; cpu: PIL decode + augmentation in the
  workers, then the copy; gpu: files in the workers, then decode + augmentation on the device,
  one batch ahead on a side stream);
- data + step (--train): the same followed by main_distill's BINGO training step
  (models.fast.TrainStep; ResNet-18 student, randomly initialised ResNet-50 teacher, MoCo v2
  head), with --fast as the trainer's --fast (bf16, channels-last, fast views, CUDA graph);
and, with --train, the training step alone on fixed views. On CUDA it first times the GPU
pipeline's two parts on single batches: decoding (nvJPEG) and the views. Prints a table and
writes --json.
"""
import glob
import io
import json
import os
import shutil
import tempfile
import time
import zipfile

import numpy as np
import torch
from absl import app, flags
from PIL import Image

from data.bags import BagDataset
from data.folder import ImageFolder
from data import gpu_augment
from data.jpeg_bags import EncodedBagDataset, decode_images, views_on_device
from data.transforms import moco_v2_augmentation
from models import ARCHS, Embedder, build_backbone, build_student, moco_head
from models.distill import build_training_module, student_optimizer
from models.fast import TrainStep
from utils.training import make_loader

FLAGS = flags.FLAGS
flags.DEFINE_string('source', 'datasets/foolbox-3.3.4-py3-none-any.whl',
                    "foolbox's wheel (pip download --no-deps -d datasets foolbox==3.3.4) or a folder of JPEGs.")
flags.DEFINE_string('data_dir', 'datasets/bench_jpegs', 'Where the benchmark ImageFolder is built (once).')
flags.DEFINE_integer('num_images', 8192, 'Files in the benchmark folder (enough for 16 workers\' prefetched batches).')
flags.DEFINE_integer('num_classes', 8, 'Class folders they are spread over.')
flags.DEFINE_enum('encoding', 'baseline', ['baseline', 'original'],
                  'baseline: re-encode as baseline JPEG, quality 90 (as ImageNet); original: the bytes as shipped.')
flags.DEFINE_list('pipelines', ['cpu', 'gpu'], 'Pipelines to time.')
flags.DEFINE_list('workers', ['16'], 'DataLoader worker counts to time.')
flags.DEFINE_integer('batch_size', 128, 'Samples per batch (per GPU).')
flags.DEFINE_integer('image_size', 224, 'View size.')
flags.DEFINE_integer('steps', 20, 'Timed batches per measurement.')
flags.DEFINE_integer('warmup_steps', 3, 'Batches before the clock starts.')
flags.DEFINE_bool('train', False, 'Also time data + training step, and the training step alone.')
flags.DEFINE_enum('arch', 'resnet18', ARCHS, 'Student backbone.')
flags.DEFINE_enum('teacher_arch', 'resnet50', ARCHS, 'Teacher backbone (random weights).')
flags.DEFINE_integer('queue_size', 16384, 'Queue length of the training step.')
flags.DEFINE_bool('fast', True, "The training step as main_distill.py --fast (CUDA); else fp32, eager.")
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.")
flags.DEFINE_string('json', None, 'Write the results here as JSON.')


def source_jpegs(source):
    """(name, bytes) of the source images: foolbox's imagenet_*.jpg from its wheel, or a folder's JPEGs."""
    if not os.path.exists(source):
        raise app.UsageError(f'--source={source} does not exist; fetch it with '
                             f'`pip download --no-deps -d {os.path.dirname(source) or "."} foolbox==3.3.4`')
    if os.path.isdir(source):
        paths = sorted(glob.glob(os.path.join(source, '*.jp*g')) + glob.glob(os.path.join(source, '*.JP*G')))
        files = []
        for path in paths:
            with open(path, 'rb') as f:
                files.append((os.path.basename(path), f.read()))
    else:
        with zipfile.ZipFile(source) as wheel:
            names = sorted(n for n in wheel.namelist()
                           if os.path.basename(n).startswith('imagenet_') and n.endswith('.jpg'))
            files = [(os.path.basename(n), wheel.read(n)) for n in names]
    if not files:
        raise app.UsageError(f'--source={source} holds no ImageNet JPEGs (imagenet_*.jpg)')
    return files


def build_folder(source, root, num_images, num_classes, encoding):
    """root/<encoding>_<num_images>/train/c<k>/<n>.jpg, the source images in turn; built in a
    temporary folder and renamed into place, so an existing folder is complete."""
    folder = os.path.join(root, f'{encoding}_{num_images}')
    if os.path.isdir(folder):
        return folder
    files = source_jpegs(source)
    if encoding == 'baseline':
        files = [(name, _baseline(data)) for name, data in files]
    os.makedirs(root, exist_ok=True)
    scratch = tempfile.mkdtemp(dir=root, prefix='.building-')
    for n in range(num_images):
        class_dir = os.path.join(scratch, 'train', f'c{n % num_classes}')
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f'{n:06d}.jpg'), 'wb') as f:
            f.write(files[n % len(files)][1])
    try:
        os.rename(scratch, folder)
    except OSError:  # built meanwhile by another run
        shutil.rmtree(scratch)
    return folder


def _baseline(data):
    with Image.open(io.BytesIO(data)) as img:
        out = io.BytesIO()
        img.convert('RGB').save(out, format='JPEG', quality=90, progressive=False)
    return out.getvalue()


def random_neighbours(n, k=5, seed=0):
    """(n, k) neighbour rows, no image its own neighbour (bags need no meaning to time them)."""
    rng = np.random.default_rng(seed)
    return (np.arange(n)[:, None] + rng.integers(1, n, size=(n, k))) % n


def build_step(device, arch, teacher_arch, queue_size, fast):
    """main_distill's BINGO step (models.fast.TrainStep) with a randomly initialised teacher:
    timings do not depend on weights. fast: as --fast, on CUDA."""
    backbone = build_backbone(teacher_arch)
    teacher = Embedder(backbone, moco_head(backbone.feature_dim))
    fast = fast and device.type == 'cuda'
    torch.backends.cudnn.benchmark = fast
    model = build_training_module('bingo', build_student(arch), teacher, queue_size=queue_size,
                                  precision='bf16' if fast else 'fp32', channels_last=fast,
                                  fast_views=fast).to(device)
    train_step = TrainStep(model, student_optimizer(model, 0.03), 'graph' if fast else 'ddp')
    return lambda views: train_step(views, lam=(0.5, 0.5))


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def timed(batches, step, device, warmup_steps, steps, views_shape):
    """Samples/s over `steps` batches of views after warmup_steps; checks the last views' shape."""
    it = iter(batches)
    for n in range(warmup_steps + steps):
        if n == warmup_steps:
            sync(device)
            start = time.perf_counter()
        views = next(it)[-1]  # (step, views) from views_on_device, or fixed views
        if step is not None:
            step(views)
    sync(device)
    elapsed = time.perf_counter() - start
    if len(views) != 4 or any(v.shape != views_shape or not torch.isfinite(v).all() for v in views):
        raise RuntimeError(f'bad views: {[tuple(v.shape) for v in views]}')
    return steps * views_shape[0] / elapsed


def gpu_parts(dataset, device, batch_size, image_size, batches=5):
    """Milliseconds per batch of the GPU pipeline's decoding and views, each synchronised, over
    `batches` batches after one warm-up (compiling the colour ops); the batch's JPEG and view counts."""
    loader, _ = make_loader(dataset, batch_size, 4, train=True)
    decode_ms, views_ms = [], []
    for n, batch in zip(range(batches + 1), loader):
        encoded = list(batch['data'].split(batch['lengths'].tolist()))
        sync(device)
        start = time.perf_counter()
        images = decode_images(encoded, batch['path'], device, batch['jpeg'].tolist(), batch['shapes'].tolist())
        sync(device)
        middle = time.perf_counter()
        gpu_augment.draw_views(images, image_size, views_per_image=2)
        sync(device)
        if n:
            decode_ms.append(1000 * (middle - start))
            views_ms.append(1000 * (time.perf_counter() - middle))
    return float(np.median(decode_ms)), float(np.median(views_ms)), len(encoded), 2 * len(encoded)


def main(argv):
    del argv
    device = torch.device('cuda' if FLAGS.device == 'auto' and torch.cuda.is_available()
                          else 'cpu' if FLAGS.device == 'auto' else FLAGS.device)
    needed = (max(FLAGS.warmup_steps, 2 * max(map(int, FLAGS.workers)) + 1) + FLAGS.steps) * FLAGS.batch_size
    if needed > FLAGS.num_images:
        raise app.UsageError(f'--num_images={FLAGS.num_images} < the {needed} samples one measurement reads')
    root = build_folder(FLAGS.source, FLAGS.data_dir, FLAGS.num_images, FLAGS.num_classes, FLAGS.encoding)
    folder = ImageFolder(os.path.join(root, 'train'))
    neighbours = random_neighbours(len(folder))
    print(f'{len(folder)} {FLAGS.encoding} JPEGs in {root}; batch {FLAGS.batch_size}, views '
          f'{FLAGS.image_size} px, device {device}, {os.cpu_count()} CPUs', flush=True)
    step = build_step(device, FLAGS.arch, FLAGS.teacher_arch, FLAGS.queue_size, FLAGS.fast) if FLAGS.train else None
    views_shape = (FLAGS.batch_size, 3, FLAGS.image_size, FLAGS.image_size)

    results = []
    if FLAGS.train:
        fixed = [torch.randn(views_shape, device=device) for _ in range(4)]
        rate = timed(iter(lambda: (0, fixed), None), step, device, FLAGS.warmup_steps, FLAGS.steps, views_shape)
        results.append({'pipeline': 'none', 'workers': 0, 'what': 'step only', 'samples_per_s': rate})
        print(f'training step alone: {rate:8.1f} samples/s', flush=True)
    if 'gpu' in FLAGS.pipelines and device.type == 'cuda':
        decode_ms, views_ms, jpegs, views = gpu_parts(EncodedBagDataset(folder, neighbours), device,
                                                      FLAGS.batch_size, FLAGS.image_size)
        results.append({'pipeline': 'gpu', 'what': 'parts', 'decode_ms': decode_ms, 'views_ms': views_ms,
                        'jpegs': jpegs, 'views': views})
        print(f'gpu pipeline parts, per batch: decode {decode_ms:.1f} ms ({jpegs} JPEGs), '
              f'views {views_ms:.1f} ms ({views} views)', flush=True)
    for pipeline in FLAGS.pipelines:
        if pipeline == 'gpu':
            dataset = EncodedBagDataset(folder, neighbours)
        else:
            dataset = BagDataset(folder, neighbours, moco_v2_augmentation(FLAGS.image_size))
        for workers in map(int, FLAGS.workers):
            for what, what_step in [('data', None)] + ([('data + step', step)] if FLAGS.train else []):
                torch.manual_seed(0)
                loader, _ = make_loader(dataset, FLAGS.batch_size, workers, train=True)
                batches = views_on_device(enumerate(loader), pipeline, device, FLAGS.image_size, 4)
                # The loader holds 2 batches per worker ready: warm up past them, or the clock
                # would time that queue instead of the pipeline.
                rate = timed(batches, what_step, device, max(FLAGS.warmup_steps, 2 * workers + 1), FLAGS.steps,
                             views_shape)
                results.append({'pipeline': pipeline, 'workers': workers, 'what': what, 'samples_per_s': rate})
                print(f'{pipeline} pipeline, {workers:2d} workers, {what:11s}: {rate:8.1f} samples/s '
                      f'({rate / max(workers, 1):6.1f} per worker)', flush=True)
    if FLAGS.json:
        record = {'device': str(device), 'cuda_name': torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
                  'cpus': os.cpu_count(), 'flags': {k: FLAGS[k].value for k in (
                      'num_images', 'encoding', 'batch_size', 'image_size', 'steps', 'warmup_steps', 'arch',
                      'teacher_arch', 'fast')}, 'results': results}
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.json)), exist_ok=True)
        tmp = FLAGS.json + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, FLAGS.json)


if __name__ == '__main__':
    app.run(main)
