"""Training-time waveform augmentation: random gain and a random start offset.

Why: on the demo corpus about 48 training clips are memorised within a few epochs (contrastive
loss 3.1 -> 0.02, ``benchmarks/results/split_spread.md``). A clip heard louder or softer, or
starting a little later (so YAMNet's 0.96-s patches fall on other frames), is the same sound with
the same caption; showing those variants is the standard remedy for tiny audio sets. Evaluation and
the CLI never augment: the same file must give the same embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor


def augment_waveform(wave: Tensor, sample_rate: int, gain_db: float, shift_s: float,
                     generator: torch.Generator) -> Tensor:
    """``wave`` scaled by a gain uniform in [-gain_db, +gain_db] dB, after a silence uniform in [0, shift_s].

    Both knobs at 0 return ``wave`` itself. Draws come from ``generator`` (seeded per epoch by the
    caller), so a resumed run sees the same variants as an uninterrupted one.
    """
    if gain_db < 0 or shift_s < 0:
        raise ValueError(f"augmentation ranges must be >= 0, got gain_db={gain_db}, shift_s={shift_s}")
    out = wave
    if gain_db > 0:
        db = (torch.rand((), generator=generator) * 2 - 1) * gain_db
        out = out * float(10 ** (db / 20))
    if shift_s > 0:
        pad = int(torch.randint(0, int(shift_s * sample_rate) + 1, (), generator=generator))
        if pad:
            out = torch.cat([out.new_zeros(pad), out])
    return out
