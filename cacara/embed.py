"""The embedding contract other tools rely on (``cacara embed-audio`` / ``embed-text``, the service).

Audio of any format soundfile reads, any rate, mono or stereo, is decoded and resampled the same way
as in training, then embedded by the model's ONNX export through onnxruntime (model/inference.py);
texts in any language go through the frozen tower the model was trained against.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from cacara import audio
from model.cacara_model import CacaraModel, load_model
from model.inference import AudioEmbedder, embedder_for

log = logging.getLogger(__name__)

#: Files decoded before they are embedded as one set of length-sorted batches: bounds the memory
#: decoded audio takes (256 clips of 30 s are 490 MB of float32) while keeping batches full.
DECODE_CHUNK = 256


class Embedder:
    """One trained model folder, ready to embed audio and text into its shared space.

    The CLI, the service and the index builder share this object: load once, embed many times.
    """

    def __init__(self, model: CacaraModel, audio: AudioEmbedder):
        self.model = model
        self.audio = audio
        self._text_encoder = None

    @classmethod
    def load(cls, model_dir: str | Path) -> "Embedder":
        """A model folder with the inference path its encoder allows (its ONNX export on CPU)."""
        model = load_model(model_dir)
        return cls(model, embedder_for(model, model_dir))

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def dim(self) -> int:
        return int(self.model.config["out_dim"])

    def embed_waveforms(self, waves: Sequence[np.ndarray], progress: bool = False) -> np.ndarray:
        """(N, D) float32 for mono waveforms already at :attr:`sample_rate`."""
        if not waves:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.audio.embed(waves, progress=progress)

    def embed_audio_files(self, files: Sequence[str | Path], max_bytes: int | None = None) -> np.ndarray:
        """(N, D) float32, row i for file i, decoded and embedded ``DECODE_CHUNK`` files at a time; a file
        that cannot be used raises AudioError naming it, and nothing is returned."""
        out = np.zeros((len(files), self.dim), dtype=np.float32)
        bar = tqdm(total=len(files), desc="embed audio", unit="file", disable=None)
        for start in range(0, len(files), DECODE_CHUNK):
            chunk = files[start:start + DECODE_CHUNK]
            waves = [self.decode(f, max_bytes) for f in chunk]
            out[start:start + len(chunk)] = self.embed_waveforms(waves)
            bar.update(len(chunk))
        bar.close()
        return out

    def decode(self, path: str | Path, max_bytes: int | None = None) -> np.ndarray:
        """Mono float32 at the model's rate; errors name the file."""
        try:
            return audio.decode(path, self.sample_rate, max_bytes=max_bytes).samples
        except FileNotFoundError as exc:
            raise audio.AudioError("missing_file", str(path)) from exc
        except audio.AudioError as exc:
            raise audio.AudioError(exc.reason, f"{path}: {exc.detail}") from exc

    def embed_texts(self, texts: Sequence[str], language: str | None = None) -> np.ndarray:
        """(N, D) float32 from the frozen tower the model was trained against: same space as the audio.

        Rows are centred as the model's training and evaluation centred them (model/text_centering.py):
        with ``language`` (a caption language code such as ``de`` or ``pt-BR``) by that language's mean,
        without it by the mean over all languages.
        """
        if self._text_encoder is None:
            from model.text_encoders import build_text_encoder

            self._text_encoder = build_text_encoder(self.model.config["text_encoder"])
        raw = np.asarray(self._text_encoder.encode(list(texts)), dtype=np.float32)
        return self.model.text_centroids.apply(raw, language)


@lru_cache(maxsize=4)
def cached_embedder(model_dir: str) -> Embedder:
    return Embedder.load(model_dir)


def embed_audio_files(model_dir: str | Path, files: Sequence[str | Path], max_bytes: int | None = None) -> np.ndarray:
    """(N, D) float32, row i for file i (see :meth:`Embedder.embed_audio_files`)."""
    if not files:
        raise ValueError("no audio files given")
    # Checked before the model loads, so a typo fails in milliseconds.
    for f in files:
        if not Path(f).is_file():
            raise audio.AudioError("missing_file", str(f))
    return cached_embedder(str(model_dir)).embed_audio_files(list(files), max_bytes)


def embed_texts(model_dir: str | Path, texts: Sequence[str], language: str | None = None) -> np.ndarray:
    """(N, D) float32 in the model's space (see :meth:`Embedder.embed_texts`)."""
    return cached_embedder(str(model_dir)).embed_texts(texts, language)


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
