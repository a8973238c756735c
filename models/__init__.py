"""Backbones, heads, pretrained checkpoints and the BINGO objective."""
from models.backbones import ARCHS, build_backbone
from models.heads import Embedder, build_student, moco_head, swav_head
from models.loss import bingo_loss
from models.pretrained import CheckpointError, load_pretrained, read_pretrained

__all__ = ['ARCHS', 'build_backbone', 'CheckpointError', 'load_pretrained', 'read_pretrained',
           'Embedder', 'build_student', 'moco_head', 'swav_head', 'bingo_loss']
