"""Stage 1: the frozen teacher embeds every training image; an exact k-nearest-neighbour search
writes the bags, an (N, k) array of dataset indices, nearest first (SPEC stage 1).

    torchrun --nproc_per_node=8 knn_extract.py --data_dir=DATA --teacher=moco_v2_800ep.pth.tar \
        --teacher_arch=resnet50 --output=bags/r50_moco800_k5.npy

Each rank embeds its shard in dataset order; rows are reassembled by dataset index, every rank
holds the whole feature matrix and searches its share of the queries. `--batch_size` is global,
as in the other two stages.
"""
import hashlib
import os
import time

import torch
from absl import app, flags

from data.folder import ImageFolder
from data.neighbours import bag_precision, save_neighbours
from data.transforms import eval_transform
from models import ARCHS, load_backbone
from models.checkpoints import FORMATS
from utils import dist, knn
from utils.features import embed, gather_by_index
from utils.training import make_loader

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/.')
flags.DEFINE_string('teacher', None, 'Teacher checkpoint.')
flags.DEFINE_enum('teacher_arch', 'resnet50', ARCHS, 'Teacher backbone.')
flags.DEFINE_enum('teacher_format', 'auto', FORMATS, 'Teacher checkpoint layout.')
flags.DEFINE_integer('clus_pos_num', 5, 'k, neighbours kept per image (the released name).')
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.')
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.')
flags.DEFINE_integer('image_size', 224, 'Centre-crop size (Resize to size*256/224 first).')
flags.DEFINE_string('output', None, 'Neighbour file to write (.npy; a .json sidecar goes beside it).')
flags.DEFINE_enum('knn_backend', 'auto', knn.BACKENDS, 'Exact search engine.')
flags.DEFINE_enum('self_removal', 'anywhere', ['anywhere', 'first_column'],
                  "anywhere: the image's own index is removed from its k+1 nearest wherever it appears "
                  '(SPEC); first_column: column 0 of the k+1 nearest is dropped whatever it holds (the '
                  'released compute_knn.py; the two differ only where a duplicate image outranks the '
                  'image itself).')
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.")
flags.DEFINE_integer('report_freq', 20, 'Print progress every this many batches.')
flags.mark_flags_as_required(['data_dir', 'teacher', 'output'])


def file_sha256(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def main(argv):
    del argv
    info = dist.init_distributed(FLAGS.device)
    if FLAGS.batch_size % info.world_size:
        raise app.UsageError(f'--batch_size={FLAGS.batch_size} (global) is not divisible by '
                             f'{info.world_size} processes')
    start = time.time()
    folder = ImageFolder(os.path.join(FLAGS.data_dir, 'train'), transform=eval_transform(FLAGS.image_size))
    k = FLAGS.clus_pos_num
    if not 0 < k < len(folder):
        raise app.UsageError(f'--clus_pos_num={k} must be in [1, {len(folder) - 1}] for the '
                             f'{len(folder)} images of {folder.root}')
    teacher = load_backbone(FLAGS.teacher_arch, FLAGS.teacher, FLAGS.teacher_format).to(info.device).eval()
    per_rank_batch = FLAGS.batch_size // info.world_size
    loader, sampler = make_loader(folder, per_rank_batch, FLAGS.workers, train=False)
    if dist.is_main():
        print(f'embedding {len(folder)} images: {len(loader)} steps of {FLAGS.batch_size} '
              f'({per_rank_batch} per process) on {info.world_size} x {info.device.type}', flush=True)
    shard, _ = embed(teacher, loader, info.device, {'stage': 'embed'}, FLAGS.report_freq)
    features = gather_by_index(shard, list(sampler), len(folder))  # (N, d) on every rank
    embed_seconds = time.time() - start

    # Each rank searches an equal share of the queries; shares are padded to one length to gather.
    n, world = len(folder), info.world_size
    share = -(-n // world)
    begin, end = min(info.rank * share, n), min((info.rank + 1) * share, n)
    search_start = time.time()
    if FLAGS.self_removal == 'first_column':  # as released: the nearest is taken to be the image itself
        rows = knn.search(features, features[begin:end], k + 1, FLAGS.knn_backend)[1][:, 1:]
    else:
        rows = torch.as_tensor(knn.neighbours_excluding_self(features, k, FLAGS.knn_backend, (begin, end)))
    rows = torch.cat([rows, rows.new_zeros(share - rows.shape[0], k)]).to(info.device)
    neighbours = dist.all_gather_cat(rows)[:n].cpu().numpy()
    search_seconds = time.time() - search_start

    if dist.is_main():
        precision = bag_precision(neighbours, folder.targets)
        save_neighbours(FLAGS.output, neighbours, {
            'teacher_arch': FLAGS.teacher_arch, 'teacher_checkpoint': os.path.basename(FLAGS.teacher),
            'teacher_sha256': file_sha256(FLAGS.teacher), 'feature_dim': features.shape[1],
            'dataset_root': os.path.abspath(folder.root), 'dataset_fingerprint': folder.fingerprint(),
            'backend': FLAGS.knn_backend, 'self_removal': FLAGS.self_removal, 'world_size': world,
            'bag_precision': precision,
            'embed_seconds': round(embed_seconds, 2), 'search_seconds': round(search_seconds, 2)})
        print(f'wrote {FLAGS.output}: {n} x {k} neighbours; embedding {embed_seconds:.1f}s, '
              f'search {search_seconds:.1f}s; bag precision {precision:.4f} '
              f'(share of neighbours in their anchor\'s class folder)', flush=True)
    dist.barrier()
    dist.cleanup()


if __name__ == '__main__':
    app.run(main)
