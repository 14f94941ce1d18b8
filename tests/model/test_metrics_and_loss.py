"""Metrics against a similarity matrix computed by hand; the loss on cases with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.losses import ContrastiveLoss
from model.metrics import paired_bootstrap, retrieval_metrics, t2a_hits

# Rows: captions t0..t3; columns: clips c0..c2. t0, t1 describe c0; t2 -> c1; t3 -> c2.
SIM = np.array([[0.9, 0.1, 0.5],   # t0: c0 ranked 1st
                [0.2, 0.8, 0.3],   # t1: c0 ranked 3rd
                [0.7, 0.6, 0.1],   # t2: c1 ranked 2nd
                [0.4, 0.4, 0.4]])  # t3: three-way tie -> pessimistic rank 3
TEXT_CLIP = [0, 0, 1, 2]


def test_metrics_match_hand_computation():
    m = retrieval_metrics(SIM, np.eye(3), TEXT_CLIP)
    # text->audio ranks 1, 3, 2, 3
    assert m["t2a_R@1"] == pytest.approx(25.0)
    assert m["t2a_R@5"] == pytest.approx(100.0)
    assert m["t2a_mAP@10"] == pytest.approx(100 * (1 + 1 / 3 + 1 / 2 + 1 / 3) / 4)
    # audio->text: c0 ranks its captions 1 and 4 (best 1, AP (1 + 2/4)/2); c1 -> 2; c2 -> 2 (0.5 beats 0.4)
    assert m["a2t_R@1"] == pytest.approx(100 / 3)
    assert m["a2t_R@5"] == pytest.approx(100.0)
    assert m["a2t_mAP@10"] == pytest.approx(100 * (0.75 + 0.5 + 0.5) / 3)
    assert (m["n_texts"], m["n_clips"]) == (4, 3)


def test_constant_scores_never_look_good():
    m = retrieval_metrics(np.ones((6, 1)), np.ones((6, 1)), list(range(6)))
    assert m["t2a_R@1"] == 0.0 and m["a2t_R@1"] == 0.0


def test_perfect_embeddings_score_100():
    e = np.eye(5)
    m = retrieval_metrics(e, e, list(range(5)))
    assert all(m[k] == 100.0 for k in m if "@" in k)


def test_loss_prefers_aligned_pairs_and_is_symmetric():
    torch.manual_seed(0)
    loss = ContrastiveLoss(init_temperature=0.1)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=-1)
    aligned = loss(a, a)
    shuffled = loss(a, a.roll(1, dims=0))
    assert aligned < shuffled
    assert loss(a, a.roll(1, dims=0)).item() == pytest.approx(loss(a.roll(1, dims=0), a).item(), rel=1e-6)
    # uniform logits give log(B)
    zero_scale = ContrastiveLoss(init_temperature=1e9)
    assert zero_scale(a, a.roll(2, dims=0)).item() == pytest.approx(math.log(8), abs=1e-3)


def test_temperature_is_learned_and_clamped():
    loss = ContrastiveLoss(init_temperature=0.07, max_logit_scale=100.0)
    a = torch.randn(4, 8, requires_grad=True)
    loss(a, torch.randn(4, 8)).backward()
    assert loss.logit_scale.grad is not None and a.grad is not None
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)
    assert loss.temperature == pytest.approx(0.01)


def test_t2a_hits_average_to_r_at_1():
    rng = np.random.default_rng(3)
    t, a = rng.standard_normal((12, 8)), rng.standard_normal((5, 8))
    owners = [i % 5 for i in range(12)]
    hits = t2a_hits(t, a, owners)
    assert hits.dtype == bool and hits.shape == (12,)
    assert 100 * hits.mean() == pytest.approx(retrieval_metrics(t, a, owners)["t2a_R@1"])


def test_paired_bootstrap_separates_real_gaps_from_noise():
    owners = np.repeat(np.arange(30), 2)  # 30 clips, 2 captions each
    better = np.ones(60, bool)
    worse = np.zeros(60, bool)
    diff, lo, hi = paired_bootstrap(better, worse, owners, draws=500, seed=0, confidence=0.95)
    assert diff == 100.0 and lo == 100.0 and hi == 100.0
    one_clip = np.zeros(60, bool)
    one_clip[:2] = True  # a single clip apart: the interval must include zero
    diff, lo, hi = paired_bootstrap(one_clip, worse, owners, draws=500, seed=0, confidence=0.95)
    assert diff == pytest.approx(100 / 30) and lo <= 0.0 <= hi
    # Deterministic for a seed
    assert paired_bootstrap(one_clip, worse, owners, 200, 1, 0.9) == paired_bootstrap(one_clip, worse, owners, 200, 1, 0.9)
