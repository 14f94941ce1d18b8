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


DEMO = REPO / "data"


def demo_subset(dest: Path, per_split: dict[str, int], languages: tuple[str, ...] = ("en", "fr", "de", "es")) -> Path:
    """A small canonical dataset cut from the real demo corpus (restored by `dvc pull`).

    Splits are reassigned so a handful of clips gives train, val and test; captions are limited to a
    few languages to keep text embedding quick.
    """
    import json
    import shutil

    from cacara.manifest import read_manifest, write_manifest

    if not (DEMO / "manifest.jsonl").exists():
        raise RuntimeError("the demo corpus is missing: run `make test` (it runs `dvc pull`) first")
    clips = read_manifest(DEMO)
    chosen = []
    i = 0
    for split, n in per_split.items():
        for clip in clips[i:i + n]:
            clip.split = split
            clip.captions = {k: v for k, v in clip.captions.items() if k in languages}
            chosen.append(clip)
        i += n
    (dest / "audio").mkdir(parents=True, exist_ok=True)
    for clip in chosen:
        shutil.copyfile(DEMO / clip.audio_path, dest / clip.audio_path)
    write_manifest(chosen, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(dataset, text embedding cache, params) for quick train/evaluate tests on real clips.

    use-multilingual is the text tower here because it loads in well under a second.
    """
    from cacara.config import EmbedTextConfig
    from cacara.params import load_params
    from components.embed_text import embed_text

    root = tmp_path_factory.mktemp("tiny")
    dataset = demo_subset(root / "dataset", {"train": 8, "val": 4, "test": 4})
    params = load_params(overrides={"model.text_encoder": "use-multilingual", "train.epochs": 3,
                                    "train.batch_size": 4, "train.warmup_epochs": 1,
                                    "evaluate.english_only_text_encoder": "minilm-en",
                                    "evaluate.chance_draws": 2, "evaluate.min_captions": 1})
    embed_text(dataset, root / "text_emb", EmbedTextConfig.from_params(params))
    return dataset, root / "text_emb", params
