"""Backbones, heads, teacher checkpoints and the BINGO objective."""
from models.backbones import ARCHS, build_backbone
from models.checkpoints import CheckpointError, load_backbone, load_teacher, read_checkpoint
from models.heads import Embedder, build_student, moco_head, swav_head
from models.loss import bingo_loss

__all__ = ['ARCHS', 'build_backbone', 'CheckpointError', 'load_backbone', 'load_teacher',
           'read_checkpoint', 'Embedder', 'build_student', 'moco_head', 'swav_head', 'bingo_loss']
