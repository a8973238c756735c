"""Stage 3, weighted kNN evaluation of a frozen backbone: every val image votes with its k nearest
training images, weight exp(similarity / T); no training.

    torchrun --nproc_per_node=8 eval_knn.py --data_dir=DATA --pretrained=runs/r18/checkpoint.pth \
        --output_dir=runs/r18/knn --knn_k=20,10,200

The backbone comes from a distillation checkpoint (student weights, head dropped; its --arch too),
its exported student_backbone.pth, or any teacher checkpoint of stage 1. Both splits are centre
crops (stage 1's transform). The run ends with one JSON line, also written to
<output_dir>/result_knn.json for tools/collect_results.py. `run(args)` is the whole evaluation on
this process (utils/args.py); the command line is `main`.
"""
import os

import torch
from absl import app, flags

from data.folder import ImageFolder, check_same_classes
from data.transforms import eval_transform
from models import ARCHS
from models.pretrained import FORMATS, evaluated_backbone
from utils import dist, errors, knn
from utils.args import Args
from utils.evaluation import accuracies, correct_per_image, finish
from utils.features import embed, gather_by_index
from utils.knn_classifier import knn_classify
from utils.training import make_loader

FLAGS = flags.FlagValues()  # this script's own flags, read once in main() (utils/args.py)
flags.DEFINE_string('data_dir', None, 'ImageFolder root holding train/ and val/ with the same classes.',
                    flag_values=FLAGS)
flags.DEFINE_string('output_dir', None, 'Where result_knn.json goes.', flag_values=FLAGS)
flags.DEFINE_enum('arch', None, ARCHS, 'Backbone of --pretrained; default: the one the checkpoint records '
                  '(a distillation or MoCo checkpoint), else resnet18.', flag_values=FLAGS)
flags.DEFINE_string('pretrained', None, 'Checkpoint holding the backbone (distillation run, exported '
                    "student_backbone.pth, or a teacher), or 'random': the untrained --arch, a baseline.",
                    flag_values=FLAGS)
flags.DEFINE_enum('pretrained_format', 'auto', FORMATS,
                  "Layout of --pretrained: 'bingo' a distillation checkpoint, 'torchvision' the exported "
                  'backbone, moco/swav a teacher.', flag_values=FLAGS)
flags.DEFINE_list('knn_k', ['20'], 'Neighbours voting; the first is the headline result.', flag_values=FLAGS)
flags.DEFINE_float('knn_temperature', 0.07, 'T of the vote weight exp(similarity / T).', flag_values=FLAGS)
flags.DEFINE_enum('knn_backend', 'auto', knn.BACKENDS, 'Exact search engine.', flag_values=FLAGS)
flags.DEFINE_integer('batch_size', 256, 'Global batch size, split evenly across processes.', flag_values=FLAGS)
flags.DEFINE_integer('image_size', 224, 'Crop size; both splits resize to size*256/224 first.', flag_values=FLAGS)
flags.DEFINE_integer('workers', 8, 'DataLoader workers per process.', flag_values=FLAGS)
flags.DEFINE_integer('seed', 0, 'Seed of the initialisation of --pretrained=random.', flag_values=FLAGS)
flags.DEFINE_integer('report_freq', 10, 'Print progress every this many steps.', flag_values=FLAGS)
flags.DEFINE_string('device', 'auto', "'auto' (CUDA when available), 'cuda' or 'cpu'.", flag_values=FLAGS)
flags.mark_flags_as_required(['data_dir', 'pretrained', 'output_dir'], flag_values=FLAGS)


def check(args, world_size):
    if args.batch_size % world_size:
        raise app.UsageError(f'--batch_size={args.batch_size} is not divisible by {world_size} processes')
    if not args.knn_k or not all(k.isdigit() and int(k) > 0 for k in args.knn_k):
        raise app.UsageError(f'--knn_k={",".join(args.knn_k)} must list positive integers')


def knn_accuracy(args, backbone, train_folder, val_folder, device):
    """Weighted kNN top-1/top-5 of the val split against the whole train split, for each k."""
    ks = [int(k) for k in args.knn_k]
    if max(ks) > len(train_folder):
        raise app.UsageError(f'--knn_k={max(ks)} exceeds the {len(train_folder)} images of '
                             f'{train_folder.root}')
    backbone.to(device).eval()
    per_rank_batch = args.batch_size // dist.get_world_size()
    train_loader, train_sampler = make_loader(train_folder, per_rank_batch, args.workers, train=False)
    val_loader, val_sampler = make_loader(val_folder, per_rank_batch, args.workers, train=False)
    train_features, _ = embed(backbone, train_loader, device, {'embed': 'train'}, args.report_freq)
    database = gather_by_index(train_features, list(train_sampler), len(train_folder))  # (N, d)
    queries, targets = embed(backbone, val_loader, device, {'embed': 'val'}, args.report_freq)  # this rank's shard
    ranked = knn_classify(database, torch.as_tensor(train_folder.targets, device=device), queries, ks,
                          len(train_folder.classes), args.knn_temperature, args.knn_backend)
    by_k = {k: accuracies(correct_per_image(ranked[k], targets), list(val_sampler), len(val_folder))
            for k in ks}
    return {**by_k[ks[0]], 'k': ks[0], 'temperature': args.knn_temperature,
            'by_k': {str(k): value for k, value in by_k.items()}}


def run(args):
    """The kNN evaluation on this process (alone, or one of torchrun's); returns the result."""
    info = dist.init_distributed(args.device)
    check(args, info.world_size)
    torch.manual_seed(args.seed)  # --pretrained=random
    train_folder = ImageFolder(os.path.join(args.data_dir, 'train'), eval_transform(args.image_size))
    val_folder = ImageFolder(os.path.join(args.data_dir, 'val'), eval_transform(args.image_size))
    check_same_classes(train_folder, val_folder)
    backbone, source = evaluated_backbone(args.pretrained, args.pretrained_format, args.arch)
    result = knn_accuracy(args, backbone, train_folder, val_folder, info.device)
    finish(result, os.path.join(args.output_dir, 'result_knn.json'), source)
    dist.cleanup()
    return result


def main(argv):
    del argv
    run(Args.from_flags(FLAGS))


if __name__ == '__main__':
    errors.run(main, FLAGS)
