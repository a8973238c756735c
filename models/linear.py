"""The classifier of stage 3: a backbone and one Linear layer, the backbone frozen (SPEC's linear
probe) or trained with it (fine-tuning on few labels)."""
import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearClassifier(nn.Module):
    """Backbone -> pooled features (B, d) -> Linear(d, classes), weight N(0, 0.01), bias 0.

    frozen (the linear probe): the backbone's parameters have requires_grad=False, its forward runs
    without autograd, and it stays in eval mode whatever `.train()` is called with, so BatchNorm
    normalises with, and never updates, its running statistics. Only `.linear` has anything to learn.
    Not frozen (fine-tuning): backbone and classifier train together, the backbone's BatchNorm in
    train mode (batch statistics, running statistics updated), as fine-tuning on few labels is done.

    normalise: the pooled features are L2-normalised before the Linear, so that one lr fits networks
    whose features differ in scale by orders of magnitude (an untrained network's are in the
    hundreds); off, as released.
    """

    def __init__(self, backbone, num_classes, frozen=True, normalise=False):
        super().__init__()
        self.frozen, self.normalise = frozen, normalise
        self.backbone = backbone.requires_grad_(not frozen).eval()
        self.linear = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.linear.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def features(self, images):  # (B, 3, H, W) -> (B, d)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            features = self.backbone(images)
        return F.normalize(features, dim=1) if self.normalise else features

    def forward(self, images):  # (B, 3, H, W) -> (B, classes) logits
        return self.linear(self.features(images))

    def backbone_digest(self):
        """{name: sha256 hex} of every backbone parameter and buffer (BatchNorm statistics too).

        Two digests are equal iff no backbone tensor changed by even one bit; a probe checkpoint
        stores one so that a resumed or evaluated probe is paired with the backbone it was trained on.
        """
        return {name: hashlib.sha256(tensor.detach().cpu().contiguous().reshape(-1)
                                     .view(torch.uint8).numpy()).hexdigest()
                for name, tensor in self.backbone.state_dict().items()}
