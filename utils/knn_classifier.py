"""Weighted k-nearest-neighbour classification: the cheap check of frozen features.

Features are L2-normalised, so the similarity of two images is the cosine of their features.
Each query's k most similar training images vote for their own class with weight
exp(similarity / T) (k = 20, T = 0.07 by default); classes are ranked by their vote totals.

Tie rule: classes with equal vote totals are ranked by class index, lowest first (a stable
sort), so equal totals always resolve the same way on every device and process count.
"""
import torch

from utils import knn


def knn_vote(similarities, neighbour_labels, num_classes, temperature=0.07):
    """Vote totals (Q, num_classes) of the neighbours (Q, k) with their cosine similarities (Q, k).

    Weights are computed as exp((s - s_max) / T) with s_max each query's largest similarity:
    a common factor per query, which leaves the ranking unchanged and keeps exp in range for a
    small T.
    """
    similarities = similarities.float()
    weights = ((similarities - similarities.max(dim=1, keepdim=True).values) / temperature).exp()
    votes = weights.new_zeros(similarities.shape[0], num_classes)
    return votes.scatter_add_(1, neighbour_labels.long(), weights)


def rank_classes(votes):
    """Class indices (Q, C), most votes first; equal totals: lowest class index first."""
    return torch.sort(votes, dim=1, descending=True, stable=True).indices


def knn_classify(database, labels, queries, ks, num_classes, temperature=0.07, backend='auto'):
    """{k: (Q, C) ranked classes} for each k in `ks`, from one search for max(ks) neighbours.

    database (N, d) and queries (Q, d): L2-normalised features; labels (N,) class per row.
    """
    similarities, neighbours = knn.search(database, queries, max(ks), backend)  # (Q, max k) each
    neighbour_labels = labels.to(neighbours.device)[neighbours]
    return {k: rank_classes(knn_vote(similarities[:, :k], neighbour_labels[:, :k], num_classes, temperature))
            for k in ks}
