"""The embedding contract other tools rely on (``cacara embed-audio`` / ``embed-text``, the service).

Audio of any format soundfile reads, any rate, mono or stereo, is decoded and resampled the same way
as in training; texts in any language go through the frozen tower the model was trained against.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from cacara import audio
from model.cacara_model import CacaraModel, embed_waveforms, load_model

log = logging.getLogger(__name__)


@lru_cache(maxsize=4)
def cached_model(model_dir: str) -> CacaraModel:
    return load_model(model_dir)


@lru_cache(maxsize=4)
def cached_text_encoder(name: str):
    from model.text_encoders import build_text_encoder

    return build_text_encoder(name)


def embed_audio_files(model_dir: str | Path, files: Sequence[str | Path], max_bytes: int | None = None) -> np.ndarray:
    """(N, D) float32, row i for file i; a file that cannot be used raises AudioError naming it."""
    model = cached_model(str(model_dir))
    waves = []
    for f in tqdm(files, desc="decode", unit="file", disable=None):
        try:
            waves.append(torch.from_numpy(audio.decode(f, model.sample_rate, max_bytes=max_bytes).samples))
        except FileNotFoundError as exc:
            raise audio.AudioError("missing_file", str(f)) from exc
        except audio.AudioError as exc:
            raise audio.AudioError(exc.reason, f"{f}: {exc.detail}") from exc
    return embed_waveforms(model, waves)


def embed_texts(model_dir: str | Path, texts: Sequence[str], language: str | None = None) -> np.ndarray:
    """(N, D) float32 from the frozen tower the model was trained against: same space as the audio.

    Rows are centred as the model's training and evaluation centred them (model/text_centering.py):
    with ``language`` (a caption language code such as ``de`` or ``pt-BR``) by that language's mean,
    without it by the mean over all languages.
    """
    model = cached_model(str(model_dir))
    raw = np.asarray(cached_text_encoder(model.config["text_encoder"]).encode(list(texts)), dtype=np.float32)
    return model.text_centroids.apply(raw, language)


def read_text_lines(path: str | Path) -> list[str]:
    """One text per line, UTF-8 (strict: a mis-encoded file is an error, not silent mojibake)."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not valid UTF-8 (byte {exc.start})") from exc
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        # Row i of the output must be line i of the file: a blank line would shift or drop rows.
        raise ValueError(f"{path}: empty text on line(s) {blank[:10]}")
    return lines
