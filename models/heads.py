"""Projection heads and the backbone + head embedder used for teacher and student.

Module layouts (and therefore state-dict keys '0.*', '1.*', ...) match the released
MoCo v2 and SwAV heads, so their weights load without renaming inside the head.
"""
import torch.nn as nn
import torch.nn.functional as F

from models.backbones import build_backbone


def moco_head(in_dim, hidden_dim=2048, out_dim=128):
    """MoCo v2 head: Linear -> ReLU -> Linear (keys 0.*, 2.*). Also BINGO's student MLP."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


def swav_head(in_dim, hidden_dim=8192, out_dim=128):
    """SwAV head: Linear -> BatchNorm1d -> ReLU -> Linear (keys 0.*, 1.*, 3.*)."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.BatchNorm1d(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class Embedder(nn.Module):
    """Backbone followed by a projection head; outputs L2-normalised embeddings."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):  # (B, 3, H, W) -> (B, out_dim), unit rows
        return F.normalize(self.head(self.backbone(x)), dim=1)


def build_student(arch, hidden_dim=2048, out_dim=128):
    """The BINGO student: backbone `arch` with its classifier replaced by the MoCo v2 MLP;
    hidden_dim=0 makes the MLP as wide as the backbone's features (SEED's student)."""
    backbone = build_backbone(arch)
    return Embedder(backbone, moco_head(backbone.feature_dim, hidden_dim or backbone.feature_dim, out_dim))
