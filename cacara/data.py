"""Audio batches for training and evaluation, read from the canonical dataset.

Evaluation is deterministic: whole clips, no random crops, so a clip always gives the same embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from cacara import audio
from cacara.manifest import Clip


class ClipAudio(Dataset):
    """Decoded 16 kHz mono waveforms of some clips, read lazily (real datasets do not fit in memory)."""

    def __init__(self, dataset_dir: str | Path, clips: Sequence[Clip], sample_rate: int):
        self.root = Path(dataset_dir)
        self.clips = list(clips)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.root / self.clips[i].audio_path
        try:
            decoded = audio.decode(path, self.sample_rate)
        except FileNotFoundError as exc:
            raise audio.AudioError("missing_file", f"{path} (clip {self.clips[i].clip_id})") from exc
        except audio.AudioError as exc:
            # Name the clip: a bare "undecodable" an hour into training says nothing about which file.
            raise audio.AudioError(exc.reason, f"{path} (clip {self.clips[i].clip_id}): {exc.detail}") from exc
        return torch.from_numpy(decoded.samples)


def pad_batch(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest clip; lengths let the encoder ignore the padding."""
    lengths = torch.tensor([len(w) for w in waves], dtype=torch.long)
    out = torch.zeros(len(waves), int(lengths.max()), dtype=torch.float32)
    for i, w in enumerate(waves):
        out[i, : len(w)] = w
    return out, lengths


def batches(n: int, batch_size: int) -> list[np.ndarray]:
    idx = np.arange(n)
    return [idx[i:i + batch_size] for i in range(0, n, batch_size)]
