"""Stage 1: the frozen teacher embeds every training image; an exact k-nearest-neighbour search
writes the bags, an (N, k) array of dataset indices, nearest first (SPEC stage 1).

    torchrun --nproc_per_node=8 knn_extract.py --data_dir=DATA --teacher=moco_v2_800ep.pth.tar \
        --teacher_arch=resnet50 --output=bags/r50_moco800_k5.npy

Each rank embeds its shard in dataset order; rows are reassembled by dataset index, every rank
holds the whole feature matrix and searches its share of the queries. `--batch_size` is global,
as in the other two stages. `run(args)` is the whole stage on this process (utils/args.py); the
command line is `main`.
"""
import hashlib
import os
import time

import numpy as np
import torch
from absl import app, flags

from data.folder import UNREADABLE, ImageFolder, MarkUnreadable, unreadable_error
from data.jpeg_bags import EncodedEvalBatches, EncodedTwoViewDataset
from data.neighbours import bag_precision, load_neighbours, save_neighbours, sidecar_path
from data.transforms import eval_transform, resize_size
from models import ARCHS, load_pretrained
from models.pretrained import FORMATS
from utils import atomic, dist, errors, knn
from utils.args import Args
from utils.features import embed, gather_by_index
from utils.training import make_loader

FLAGS = flags.FlagValues()  # this script's own flags, read once in main() (utils/args.py)
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/.', flag_values=FLAGS)
flags.DEFINE_string('teacher', None, 'Teacher checkpoint.', flag_values=FLAGS)
flags.DEFINE_enum('teacher_arch', 'resnet50', ARCHS, 'Teacher backbone.', flag_values=FLAGS)
flags.DEFINE_enum('teacher_format', 'auto', FORMATS, 'Teacher checkpoint layout.', flag_values=FLAGS)
flags.DEFINE_integer('clus_pos_num', 5, 'k, neighbours kept per image (the released name).', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.', flag_values=FLAGS)
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'Centre-crop size (Resize to size*256/224 first).', flag_values=FLAGS)
flags.DEFINE_string('output', None, 'Neighbour file to write (.npy; a .json sidecar goes beside it).',
                    flag_values=FLAGS)
flags.DEFINE_enum('knn_backend', 'auto', knn.BACKENDS, 'Exact search engine.', flag_values=FLAGS)
flags.DEFINE_integer('chunk_size', 4096, 'Queries per chunk of the torch search: its peak GPU memory is '
                     'utils.knn.fast_search_bytes(N, D, chunk_size).', flag_values=FLAGS)
flags.DEFINE_enum('data_pipeline', 'cpu', ['cpu', 'gpu'], 'cpu: PIL in the workers (released); gpu: nvJPEG '
                  'decoding, resize and centre crop on the device (within a grey level of PIL).', flag_values=FLAGS)
flags.DEFINE_enum('precision', 'fp32', ['fp32', 'bf16'], 'Teacher arithmetic: fp32 (released) or bf16 autocast.',
                  flag_values=FLAGS)
flags.DEFINE_bool('channels_last', False, 'Channels-last teacher and images.', flag_values=FLAGS)
flags.DEFINE_string('reference_neighbours', None, 'A neighbour file of the same data made with the default '
                    'settings: prints the share of rows the new bags share with it (to judge the opt-ins).',
                    flag_values=FLAGS)
flags.DEFINE_enum('self_removal', 'anywhere', ['anywhere', 'first_column'],
                  "anywhere: the image's own index is removed from its k+1 nearest wherever it appears "
                  '(SPEC); first_column: column 0 of the k+1 nearest is dropped whatever it holds (the '
                  'released compute_knn.py; the two differ only where a duplicate image outranks the '
                  'image itself).', flag_values=FLAGS)
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.", flag_values=FLAGS)
flags.DEFINE_integer('report_freq', 20, 'Print progress every this many batches.', flag_values=FLAGS)
flags.mark_flags_as_required(['data_dir', 'teacher', 'output'], flag_values=FLAGS)


def file_sha256(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def run(args):
    """Stage 1 on this process (alone, or one of torchrun's): embed, search, write the bags."""
    info = dist.init_distributed(args.device)
    if args.batch_size % info.world_size:
        raise app.UsageError(f'--batch_size={args.batch_size} (global) is not divisible by '
                             f'{info.world_size} processes')
    start = time.time()
    atomic.check_writable(args.output, '--output')
    atomic.check_writable(sidecar_path(args.output), '--output')
    folder = ImageFolder(os.path.join(args.data_dir, 'train'), transform=eval_transform(args.image_size))
    k = args.clus_pos_num
    if not 0 < k < len(folder):
        raise app.UsageError(f'--clus_pos_num={k} must be in [1, {len(folder) - 1}] for the '
                             f'{len(folder)} images of {folder.root}')
    teacher = load_pretrained(args.teacher_arch, args.teacher, args.teacher_format).to(info.device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    teacher.to(memory_format=memory_format)

    def network(images):  # the teacher with the chosen arithmetic; features in fp32
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=args.precision == 'bf16'):
            return teacher(images.contiguous(memory_format=memory_format)).float()

    per_rank_batch = args.batch_size // info.world_size
    if args.data_pipeline == 'gpu':  # the first unreadable image stops the run, named
        loader, sampler = make_loader(EncodedTwoViewDataset(folder), per_rank_batch, args.workers, train=False)
        loader = EncodedEvalBatches(loader, folder.targets, info.device, args.image_size,
                                    resize_size(args.image_size))
    else:  # unreadable images are marked, not fatal, so that one pass names them all
        loader, sampler = make_loader(MarkUnreadable(folder), per_rank_batch, args.workers, train=False)
    if dist.is_main():
        print(f'embedding {len(folder)} images: {len(loader)} steps of {args.batch_size} '
              f'({per_rank_batch} per process) on {info.world_size} x {info.device.type}', flush=True)
    shard, shard_labels = embed(network, loader, info.device, {'stage': 'embed'}, args.report_freq)
    features = gather_by_index(shard, list(sampler), len(folder))  # (N, d) on every rank
    unreadable = (gather_by_index(shard_labels, list(sampler), len(folder)) == UNREADABLE).nonzero().flatten()
    if len(unreadable):
        raise unreadable_error(folder, unreadable.tolist())
    embed_seconds = time.time() - start

    # Each rank searches an equal share of the queries; shares are padded to one length to gather.
    n, world = len(folder), info.world_size
    share = -(-n // world)
    begin, end = min(info.rank * share, n), min((info.rank + 1) * share, n)
    search_start = time.time()
    if args.self_removal == 'first_column':  # as released: the nearest is taken to be the image itself
        rows = knn.search(features, features[begin:end], k + 1, args.knn_backend, args.chunk_size)[1][:, 1:]
    else:
        rows = torch.as_tensor(knn.neighbours_excluding_self(features, k, args.knn_backend, (begin, end),
                                                             chunk_size=args.chunk_size))
    rows = torch.cat([rows, rows.new_zeros(share - rows.shape[0], k)]).to(info.device)
    neighbours = dist.all_gather_cat(rows)[:n].cpu().numpy()
    search_seconds = time.time() - search_start

    if dist.is_main():
        precision = bag_precision(neighbours, folder.targets)
        save_neighbours(args.output, neighbours, {
            'teacher_arch': args.teacher_arch, 'teacher_checkpoint': os.path.basename(args.teacher),
            'teacher_sha256': file_sha256(args.teacher), 'feature_dim': features.shape[1],
            'dataset_root': os.path.abspath(folder.root), 'dataset_fingerprint': folder.fingerprint(),
            'backend': knn.resolve_backend(args.knn_backend, features.device),
            'self_removal': args.self_removal, 'world_size': world,
            'bag_precision': precision,
            'embed_seconds': round(embed_seconds, 2), 'search_seconds': round(search_seconds, 2),
            'data_pipeline': args.data_pipeline, 'precision': args.precision,
            'channels_last': args.channels_last})
        print(f'wrote {args.output}: {n} x {k} neighbours; embedding {embed_seconds:.1f}s '
              f'({n / embed_seconds:.0f} images/s), search {search_seconds:.1f}s; bag precision '
              f'{precision:.4f} (share of neighbours in their anchor\'s class folder)', flush=True)
        if args.reference_neighbours:
            reference = load_neighbours(args.reference_neighbours, n, folder.fingerprint())
            same = (np.asarray(reference)[:, :k] == neighbours).all(axis=1).mean()
            same_set = (np.sort(np.asarray(reference)[:, :k], 1) == np.sort(neighbours, 1)).all(axis=1).mean()
            print(f'rows equal to {args.reference_neighbours}: {same:.4f} (same neighbours in any order: '
                  f'{same_set:.4f})', flush=True)
    dist.barrier()
    dist.cleanup()


def main(argv):
    del argv
    run(Args.from_flags(FLAGS))


if __name__ == '__main__':
    errors.run(main, FLAGS)
