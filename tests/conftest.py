"""Shared test setup: offline, no telemetry, and real audio files generated on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parent.parent


def write_tone(path: Path, seconds: float = 1.0, sr: int = 16000, channels: int = 1,
               freq: float = 440.0, amplitude: float = 0.3, seed: int = 0) -> Path:
    """A real audio file: a tone plus a little noise, so RMS and spectra are not degenerate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    mono = amplitude * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    data = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1) if channels > 1 else mono
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), sr)
    return path


@pytest.fixture
def params():
    from cacara.params import load_params

    return load_params()
