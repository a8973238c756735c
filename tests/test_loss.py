"""bingo_loss against a float64 hand computation of SPEC stage 2, steps 4-5; the peers' SEED and DisCo
losses against hand computations of their definitions (docs/peers.md)."""
import math

import pytest
import torch
import torch.nn.functional as F

from models import bingo_loss
from models.loss import (batch_keys_accuracy, bingo_paper_loss, contrast_accuracy, disco_loss, moco_batch_keys_loss,
                         moco_loss, seed_loss)


def unit(*shape):
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def hand_ce(s, positive, queue, t):
    """-log softmax(row)[0] for one sample, with explicit Python sums."""
    logits = [float(s @ positive) / t] + [float(s @ key) / t for key in queue]
    top = max(logits)
    return -(logits[0] - top - math.log(sum(math.exp(v - top) for v in logits)))


def hand_bingo(s_a, s_p, s_m, t_a, t_p, queue, mix_lambda, lam, t):
    def term(s, w):
        return sum(w[0] * hand_ce(s[b], t_a[b], queue, t) + w[1] * hand_ce(s[b], t_p[b], queue, t)
                   for b in range(s.shape[0])) / s.shape[0]
    l_self, l_cross = lam
    return (term(s_a, (l_self, l_cross)) + term(s_p, (l_cross, l_self))
            + term(s_m, (mix_lambda, 1 - mix_lambda))) / 3


@pytest.mark.parametrize('mix_lambda', [0.0, 0.37, 1.0])
@pytest.mark.parametrize('lam', [(0.5, 0.5), (1.0, 0.0)])
def test_bingo_loss_equals_hand_computation(mix_lambda, lam):
    torch.manual_seed(0)
    b, d, k, t = 4, 16, 32, 0.2
    s_a, s_p, s_m, t_a, t_p = (unit(b, d) for _ in range(5))
    queue = unit(k, d)
    loss = bingo_loss(s_a, s_p, s_m, t_a, t_p, queue, mix_lambda, lam=lam, temperature=t)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    expected = hand_bingo(s_a, s_p, s_m, t_a, t_p, queue, mix_lambda, lam, t)
    assert abs(loss.item() - expected) < 1e-6


def test_warmup_weights_ignore_the_neighbour_key_for_the_anchor_view():
    torch.manual_seed(1)
    s_a, s_p, s_m, t_a, t_p = (unit(3, 8) for _ in range(5))
    queue = unit(16, 8)
    other_t_p = unit(3, 8)
    # With lam=(1, 0) and mix_lambda=1, the neighbour key only enters through the neighbour view.
    base = bingo_loss(s_a, s_p, s_m, t_a, t_p, queue, 1.0, lam=(1.0, 0.0))
    changed = bingo_loss(s_a, s_p, s_m, t_a, other_t_p, queue, 1.0, lam=(1.0, 0.0))
    expected_delta = sum(hand_ce(s_p[b], other_t_p[b], queue, 0.2) - hand_ce(s_p[b], t_p[b], queue, 0.2)
                         for b in range(3)) / 3 / 3
    assert abs((changed - base).item() - expected_delta) < 1e-9


def test_paper_and_moco_losses_equal_hand_computation():
    torch.manual_seed(2)
    s_a, s_p, t_a = (unit(3, 8) for _ in range(3))
    queue = unit(10, 8)
    paper = bingo_paper_loss(s_a, s_p, t_a, queue, temperature=0.2).item()
    expected = sum(hand_ce(s_a[b], t_a[b], queue, 0.2) + hand_ce(s_p[b], t_a[b], queue, 0.2) for b in range(3)) / 3
    assert abs(paper - expected) < 1e-9
    moco = moco_loss(s_a, t_a, queue, temperature=0.2).item()
    assert abs(moco - sum(hand_ce(s_a[b], t_a[b], queue, 0.2) for b in range(3)) / 3) < 1e-9


def test_moco_batch_keys_loss_equals_hand_computation():
    # Rank 1 of 2: its 3 queries' positives are rows 3..5 of the 6 gathered keys; the other 5 keys
    # and the queue are negatives.
    torch.manual_seed(3)
    queries, keys, queue = unit(3, 8), unit(6, 8), unit(4, 8)
    own_rows = torch.tensor([3, 4, 5])
    loss = moco_batch_keys_loss(queries, keys, own_rows, queue, temperature=0.2).item()
    expected = 0.0
    for b in range(3):
        logits = [float(queries[b] @ k) / 0.2 for k in (*keys, *queue)]
        expected += -math.log(math.exp(logits[3 + b]) / sum(math.exp(v) for v in logits)) / 3
    assert abs(loss - expected) < 1e-9
    # Without batch keys besides its own, it is MoCo v2's loss.
    alone = moco_batch_keys_loss(queries[:1], keys[3:4], torch.tensor([0]), queue, 0.2)
    assert abs(alone.item() - moco_loss(queries[:1], keys[3:4], queue, 0.2).item()) < 1e-12


def test_batch_keys_accuracy_ranks_the_own_key_among_the_batch_and_queue():
    eye = torch.eye(5, dtype=torch.float64)
    keys, queue = eye[[0, 1, 2]], eye[[3]]  # query 0's key wins; query 1's loses to the queue key
    queries = torch.stack([eye[0], eye[3] + 0.5 * eye[1]])
    acc1, acc5 = batch_keys_accuracy(queries, keys, torch.tensor([0, 1]), queue)
    assert acc1.item() == 50.0 and acc5.item() == 100.0


def test_contrast_accuracy_counts_the_positive_rank():
    queue = torch.eye(4, dtype=torch.float64)[1:]  # keys e1, e2, e3
    student = torch.eye(4, dtype=torch.float64)[[0, 1]]  # e0 (positive wins), e1 (a queue key wins)
    key = torch.eye(4, dtype=torch.float64)[[0, 2]]
    acc1, acc5 = contrast_accuracy(student, key, queue)
    assert acc1.item() == 50.0 and acc5.item() == 100.0


def hand_softmax(logits):
    top = max(logits)
    exps = [math.exp(v - top) for v in logits]
    return [e / sum(exps) for e in exps]


def hand_seed(s, t, queue, student_t, teacher_t):
    """mean over the batch of -sum_j p_T(j) log p_S(j) over [own teacher embedding, queue]."""
    total = 0.0
    for b in range(s.shape[0]):
        candidates = [t[b]] + list(queue)
        p_teacher = hand_softmax([float(t[b] @ c) / teacher_t for c in candidates])
        p_student = hand_softmax([float(s[b] @ c) / student_t for c in candidates])
        total -= sum(pt * math.log(ps) for pt, ps in zip(p_teacher, p_student))
    return total / s.shape[0]


@pytest.mark.parametrize('teacher_temperature', [1e-4, 0.04, 0.2])
def test_seed_loss_equals_hand_computation(teacher_temperature):
    torch.manual_seed(3)
    s, t = unit(4, 8), unit(4, 8)
    queue = unit(12, 8)
    loss = seed_loss(s, t, queue, student_temperature=0.2, teacher_temperature=teacher_temperature)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert abs(loss.item() - hand_seed(s, t, queue, 0.2, teacher_temperature)) < 1e-9


def test_seed_at_the_released_teacher_temperature_is_moco_against_the_teacher_embedding():
    # t.t = 1 beats every queued key by far more than 1e-4, so the teacher's distribution is one-hot
    # on its own embedding and SEED's loss is the InfoNCE of the student against it.
    torch.manual_seed(4)
    s, t = unit(4, 8), unit(4, 8)
    queue = unit(12, 8)
    assert (t @ queue.t()).max() < 0.99
    released = seed_loss(s, t, queue, student_temperature=0.2, teacher_temperature=1e-4)
    assert abs(released.item() - moco_loss(s, t, queue, temperature=0.2).item()) < 1e-12


def test_disco_loss_equals_the_released_sum_over_32_images():
    # The release: CE + MSELoss(reduction='sum') per view over one GPU's 32 images, weight 1.
    torch.manual_seed(5)
    b, d, t = 32, 8, 0.2
    s_q, s_k, key, t_q, t_k = (unit(b, d) for _ in range(5))
    queue = unit(6, d)
    loss = disco_loss(s_q, s_k, key, t_q, t_k, queue, temperature=t)  # weight 32 per image
    contrast = sum(hand_ce(s_q[i], key[i], queue, t) for i in range(b)) / b
    squared = sum(float(x - y) ** 2 for view_s, view_t in ((s_q, t_q), (s_k, t_k))
                  for i in range(b) for x, y in zip(view_s[i], view_t[i]))
    assert loss.dtype == torch.float64 and abs(loss.item() - (contrast + squared)) < 1e-9
    unweighted = disco_loss(s_q, s_k, key, t_q, t_k, queue, temperature=t, weight=0.0)
    assert abs(unweighted.item() - contrast) < 1e-9
