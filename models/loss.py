"""BINGO's objective (SPEC stage 2, steps 4-5), the paper's variant, MoCo v2's, and the peers' SEED
and DisCo (docs/peers.md), as pure functions.

Every embedding is L2-normalised, (B, D); `queue` is (K, D), one key per row (the frozen teacher's,
or for MoCo and DisCo the momentum encoder's).
"""
import torch


def _similarities(x, positive, queue):
    """[x.positive, x.queue], the (B, 1+K) rows every contrast ranks, before any temperature."""
    return torch.cat([(x * positive).sum(dim=1, keepdim=True), x @ queue.t()], dim=1)


def _contrast_ce(student: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                 temperature: float) -> torch.Tensor:
    """Per-sample (1+K)-way cross-entropy of logits [s.positive, s.queue] / T with target 0.  (B,)"""
    positive_logit = (student * positive).sum(dim=1, keepdim=True)  # (B, 1)
    logits = torch.cat([positive_logit, negatives], dim=1) / temperature  # (B, 1+K)
    return torch.logsumexp(logits, dim=1) - logits[:, 0]


def _bag_term(student, teacher_anchor, teacher_neighbour, queue, weights, temperature):
    """w1 * CE(row 1: anchor key) + w2 * CE(row 2: neighbour key), the same K negatives in both rows."""
    negatives = student @ queue.t()  # (B, K), shared by both rows
    w_anchor, w_neighbour = weights
    return (w_anchor * _contrast_ce(student, teacher_anchor, negatives, temperature)
            + w_neighbour * _contrast_ce(student, teacher_neighbour, negatives, temperature)).mean()


def bingo_loss(student_anchor, student_neighbour, student_mix, teacher_anchor, teacher_neighbour,
               queue, mix_lambda, lam=(0.5, 0.5), temperature=0.2):
    """The released BINGO loss (SPEC step 5).

    lam = (l_self, l_cross): the anchor view is pulled to the teacher's anchor key with l_self and to
    its neighbour key with l_cross, the neighbour view the other way round; the CutMix view is
    weighted by its area shares (mix_lambda for the anchor). The trainer passes lam=(1, 0) during
    warm-up.
    """
    l_self, l_cross = lam
    terms = [
        _bag_term(student_anchor, teacher_anchor, teacher_neighbour, queue, (l_self, l_cross), temperature),
        _bag_term(student_neighbour, teacher_anchor, teacher_neighbour, queue, (l_cross, l_self), temperature),
        _bag_term(student_mix, teacher_anchor, teacher_neighbour, queue, (mix_lambda, 1.0 - mix_lambda), temperature),
    ]
    return sum(terms) / 3


def bingo_paper_loss(student_anchor, student_neighbour, teacher_anchor, queue, temperature=0.2):
    """The paper's L_intra + L_inter: both student views of the bag against the teacher's anchor key."""
    intra = _contrast_ce(student_anchor, teacher_anchor, student_anchor @ queue.t(), temperature)
    inter = _contrast_ce(student_neighbour, teacher_anchor, student_neighbour @ queue.t(), temperature)
    return intra.mean() + inter.mean()


def moco_loss(query, key, queue, temperature=0.2):
    """MoCo v2's InfoNCE: one positive key per query against the queue."""
    return _contrast_ce(query, key, query @ queue.t(), temperature).mean()


def _batch_key_similarities(query, batch_keys, queue):
    """[query.batch_keys, query.queue], the (B, G+K) rows moco_batch_keys_loss ranks."""
    return torch.cat([query @ batch_keys.t(), query @ queue.t()], dim=1)


def moco_batch_keys_loss(query, batch_keys, own_rows, queue, temperature=0.2):
    """InfoNCE with the keys of the whole (global) batch as negatives beside the queue, as MoCo v3
    and SimCLR contrast: query i's positive is batch_keys[own_rows[i]], the batch's other keys are
    negatives too. batch_keys (G, D): every rank's keys in rank order; own_rows (B,): this rank's rows."""
    logits = _batch_key_similarities(query, batch_keys, queue) / temperature  # (B, G+K)
    return (torch.logsumexp(logits, dim=1) - logits.gather(1, own_rows[:, None]).squeeze(1)).mean()


def seed_loss(student, teacher, queue, student_temperature=0.2, teacher_temperature=1e-4):
    """SEED: cross-entropy from the teacher's similarity distribution to the student's.

    Both embeddings of the image are scored against the same 1 + K candidates, the teacher's own
    embedding and the queue: p_T = softmax([t.t, t.queue] / teacher_temperature) and
    p_S = softmax([s.t, s.queue] / student_temperature); the loss is -sum p_T log p_S, batch mean.
    """
    student_logits = _similarities(student, teacher, queue) / student_temperature
    teacher_logits = _similarities(teacher, teacher, queue) / teacher_temperature
    return -(teacher_logits.softmax(dim=1) * student_logits.log_softmax(dim=1)).sum(dim=1).mean()


def consistency_loss(student, teacher):
    """DisCo's consistency term: squared L2 distance of the two embeddings, batch mean."""
    return (student - teacher).pow(2).sum(dim=1).mean()


def disco_loss(student_query, student_key, momentum_key, teacher_query, teacher_key, queue,
               temperature=0.2, weight=32.0):
    """DisCo: the student's MoCo v2 loss (query view against its momentum key and the queue) plus
    `weight` times the consistency of the student's embedding of each view with the teacher's
    embedding of the same view."""
    consistency = consistency_loss(student_query, teacher_query) + consistency_loss(student_key, teacher_key)
    return moco_loss(student_query, momentum_key, queue, temperature) + weight * consistency


def _topk_accuracy(logits, targets, topk):
    """Top-k accuracy (%) of column targets[i] in row i of logits, for each k of topk."""
    ranked = logits.topk(min(max(topk), logits.shape[1]), dim=1).indices
    return [(ranked[:, :k] == targets[:, None]).any(dim=1).float().mean() * 100 for k in topk]


@torch.no_grad()
def contrast_accuracy(student, teacher_key, queue, topk=(1, 5)):
    """Top-k accuracy (%) of the positive among [s.key, s.queue]: what the released code prints."""
    logits = _similarities(student, teacher_key, queue)
    return _topk_accuracy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device), topk)


@torch.no_grad()
def batch_keys_accuracy(query, batch_keys, own_rows, queue, topk=(1, 5)):
    """Top-k accuracy (%) of each query's own key among the batch's keys and the queue, the
    candidates moco_batch_keys_loss ranks."""
    return _topk_accuracy(_batch_key_similarities(query, batch_keys, queue), own_rows, topk)
