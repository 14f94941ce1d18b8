"""Retrieval metrics under the standard multi-caption protocol (Clotho / AudioCaps).

text->audio ranks every caption against all clips (one relevant clip each); audio->text ranks all
captions for each clip and counts the best-ranked of the clip's own captions for R@k, while mAP@10
uses all of them. Ties are broken pessimistically, so a degenerate model (all scores equal) scores at
chance or below, never perfectly.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

KS = (1, 5, 10)
MAP_AT = 10


def _pessimistic_ranks(scores: np.ndarray, relevant: np.ndarray) -> np.ndarray:
    """1-based rank of each relevant item in its row; ties count against the relevant item.

    ``scores`` [Q, N]; ``relevant`` [Q, N] boolean. Returns [Q, N] ranks (only meaningful where relevant).
    """
    # Rank of (q, j) = number of items in row q scoring >= scores[q, j] (itself included).
    asc = np.sort(scores, axis=1)
    ge = np.stack([scores.shape[1] - np.searchsorted(asc[q], scores[q], side="left")
                   for q in range(scores.shape[0])])
    return np.where(relevant, ge, 0)


def _similarity(text_emb: np.ndarray, audio_emb: np.ndarray) -> np.ndarray:
    return np.asarray(text_emb, dtype=np.float64) @ np.asarray(audio_emb, dtype=np.float64).T


def _t2a_ranks(sim: np.ndarray, text_clip: np.ndarray) -> np.ndarray:
    """Pessimistic rank of each caption's own clip among all clips ([T, A] similarities)."""
    relevant = np.zeros_like(sim, dtype=bool)
    relevant[np.arange(len(text_clip)), text_clip] = True
    return _pessimistic_ranks(sim, relevant)[np.arange(len(text_clip)), text_clip]


def _ap_at(ranks_rel: list[np.ndarray], k: int) -> np.ndarray:
    """Average precision at k for each query given the sorted ranks of its relevant items."""
    out = np.zeros(len(ranks_rel))
    for i, ranks in enumerate(ranks_rel):
        ranks = np.sort(ranks)
        hits = ranks[ranks <= k]
        if len(ranks) == 0:
            continue
        precision = np.arange(1, len(hits) + 1) / hits
        out[i] = precision.sum() / min(len(ranks), k)
    return out


def retrieval_metrics(text_emb: np.ndarray, audio_emb: np.ndarray, text_clip: Sequence[int],
                      ks: Sequence[int] = KS, map_at: int = MAP_AT) -> dict[str, float]:
    """R@k and mAP@k in both directions, in percent.

    ``text_emb`` [T, D] and ``audio_emb`` [A, D] are L2-normalised; ``text_clip[t]`` is the index of
    the clip that caption t describes. Clips without any caption are still ranked as distractors for
    text->audio but are not audio->text queries.
    """
    text_clip = np.asarray(text_clip, dtype=np.int64)
    sim = _similarity(text_emb, audio_emb)  # [T, A]
    n_text, n_audio = sim.shape
    t2a_rank = _t2a_ranks(sim, text_clip)

    sim_a = sim.T  # [A, T]
    queries = np.unique(text_clip)
    rel_a2t = text_clip[None, :] == queries[:, None]
    ranks_a2t = _pessimistic_ranks(sim_a[queries], rel_a2t)
    per_query = [ranks_a2t[i][rel_a2t[i]] for i in range(len(queries))]
    best = np.array([r.min() for r in per_query])

    out: dict[str, float] = {}
    for k in ks:
        out[f"t2a_R@{k}"] = float(100 * np.mean(t2a_rank <= k))
        out[f"a2t_R@{k}"] = float(100 * np.mean(best <= k))
    out[f"t2a_mAP@{map_at}"] = float(100 * _ap_at([np.array([r]) for r in t2a_rank], map_at).mean())
    out[f"a2t_mAP@{map_at}"] = float(100 * _ap_at(per_query, map_at).mean())
    out["n_texts"] = float(n_text)
    out["n_clips"] = float(n_audio)
    return out


def t2a_hits(text_emb: np.ndarray, audio_emb: np.ndarray, text_clip: Sequence[int], k: int = 1) -> np.ndarray:
    """Per caption, whether its clip ranks within the top ``k`` (the terms ``t2a_R@k`` averages)."""
    return _t2a_ranks(_similarity(text_emb, audio_emb), np.asarray(text_clip, dtype=np.int64)) <= k


def paired_bootstrap(hits_a: np.ndarray, hits_b: np.ndarray, text_clip: Sequence[int], draws: int, seed: int,
                     confidence: float) -> tuple[float, float, float]:
    """(difference in percent points, lower, upper) of mean(hits_a) - mean(hits_b), resampling CLIPS.

    Why clips: a clip's captions share its audio, so they are not independent draws; resampling whole
    clips (with all their captions, for both systems at once) keeps that pairing. On a 29-clip test
    split one clip moves R@1 by 3.4 points, so a per-language win is only evidence when the interval
    excludes zero.
    """
    _, owner = np.unique(np.asarray(text_clip, dtype=np.int64), return_inverse=True)
    a, b = np.asarray(hits_a, dtype=np.float64), np.asarray(hits_b, dtype=np.float64)
    # Per clip: hits of each system and caption count; a resample is a multiset of clips.
    a_sum, b_sum, count = (np.bincount(owner, weights=w) for w in (a, b, np.ones_like(a)))
    draw = np.random.default_rng(seed).integers(0, len(count), (draws, len(count)))
    diffs = (a_sum[draw].sum(axis=1) - b_sum[draw].sum(axis=1)) / count[draw].sum(axis=1)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return float(100 * (a.mean() - b.mean())), float(100 * lo), float(100 * hi)
