"""Training-time augmentation (cacara/augment.py): off means identity, on stays within its ranges."""

from __future__ import annotations

import pytest
import torch

from cacara.augment import WaveAugment

SR = 16000


def _wave() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SR // 2) * 0.1


def test_both_knobs_off_returns_the_clip_untouched():
    w = _wave()
    assert WaveAugment()(w, SR, torch.Generator().manual_seed(1)) is w


def test_gain_and_shift_stay_within_their_ranges_and_keep_the_sound():
    w = _wave()
    seen_pads, seen_gains = set(), []
    for seed in range(50):
        out = WaveAugment(6.0, 0.25)(w, SR, torch.Generator().manual_seed(seed))
        pad = out.numel() - w.numel()
        assert 0 <= pad <= SR // 4
        assert torch.count_nonzero(out[:pad]) == 0  # leading silence only
        gain = float(out[pad:].abs().sum() / w.abs().sum())
        assert 10 ** (-6 / 20) - 1e-4 <= gain <= 10 ** (6 / 20) + 1e-4
        assert torch.allclose(out[pad:] / gain, w, atol=1e-6)  # same sound, only louder or softer
        seen_pads.add(pad)
        seen_gains.append(gain)
    assert len(seen_pads) > 40 and min(seen_gains) < 0.8 < 1.25 < max(seen_gains)


def test_same_generator_state_gives_the_same_variant():
    """A resumed run reseeds per epoch, so it must see exactly the variants an uninterrupted run saw."""
    w = _wave()
    a = WaveAugment(6.0, 0.25)(w, SR, torch.Generator().manual_seed(7))
    b = WaveAugment(6.0, 0.25)(w, SR, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_negative_ranges_are_refused():
    with pytest.raises(ValueError, match="must be >= 0"):
        WaveAugment(-1.0, 0.0)
    with pytest.raises(ValueError, match="must be >= 0"):
        WaveAugment(0.0, -0.5)
