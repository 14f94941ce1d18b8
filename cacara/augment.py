"""Training-time waveform augmentation: random gain and a random start offset.

Why: on the demo corpus about 48 training clips are memorised within a few epochs (contrastive
loss 3.1 -> 0.02, ``benchmarks/results/split_spread.md``). A clip heard louder or softer, or
starting a little later (so YAMNet's 0.96-s patches fall on other frames), is the same sound with
the same caption; showing those variants is the standard remedy for tiny audio sets. Evaluation and
the CLI never augment: the same file must give the same embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WaveAugment:
    """Random gain uniform in [-gain_db, +gain_db] dB, after a leading silence uniform in [0, shift_s] s.

    Built once when training starts, so bad ranges fail before any work is done.
    """

    gain_db: float = 0.0
    shift_s: float = 0.0

    def __post_init__(self) -> None:
        if self.gain_db < 0 or self.shift_s < 0:
            raise ValueError(f"augmentation ranges must be >= 0, got gain_db={self.gain_db}, "
                             f"shift_s={self.shift_s}")

    def __call__(self, wave: Tensor, sample_rate: int, generator: torch.Generator) -> Tensor:
        """A variant of ``wave``; both knobs at 0 return ``wave`` itself.

        Draws come from ``generator`` (seeded per epoch by the caller), so a resumed run sees the same
        variants as an uninterrupted one.
        """
        out = wave
        if self.gain_db > 0:
            db = (torch.rand((), generator=generator) * 2 - 1) * self.gain_db
            out = out * float(10 ** (db / 20))
        if self.shift_s > 0:
            pad = int(torch.randint(0, int(self.shift_s * sample_rate) + 1, (), generator=generator))
            if pad:
                out = torch.cat([out.new_zeros(pad), out])
        return out
