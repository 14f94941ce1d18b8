"""Decoding, downmixing, resampling and level statistics: the one place that touches audio samples.

soundfile (libsndfile, bundled in its wheel) decodes wav/flac/ogg/mp3 without FFmpeg; torchaudio's
``functional.resample`` resamples. ``torchaudio.load`` is avoided on purpose: it needs FFmpeg.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


class AudioError(ValueError):
    """Audio that cannot be used, with a short machine-readable reason (``undecodable``, ``empty``...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class DecodedAudio:
    """Mono float32 samples at ``sample_rate`` plus what the file was before conversion."""

    samples: np.ndarray
    sample_rate: int
    orig_sample_rate: int
    orig_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / float(self.sample_rate)


#: With ``max_seconds``, at most this many samples per second of allowed audio, over all channels (96 kHz
#: stereo): a small file whose header claims many channels at a high rate would decode to gigabytes.
MAX_SAMPLES_PER_SECOND = 96_000 * 2
#: What libsndfile reports as the frame count of a file whose header does not say (SF_COUNT_MAX is 2**63 - 1).
UNKNOWN_FRAMES = 2**62


def decode(source: str | Path | bytes | BinaryIO, target_sr: int, max_bytes: int | None = None,
           max_seconds: float | None = None) -> DecodedAudio:
    """Decode any soundfile-readable input to mono float32 at ``target_sr``.

    Raises AudioError with reason ``too_large``, ``undecodable``, ``empty`` or ``too_long``; the caller
    decides whether that quarantines a clip (ingest) or answers 400 (the service). With ``max_seconds``,
    the header is checked before decoding and at most that much audio is read, so a file that decodes to
    far more samples than it weighs (or lies about its length) is refused without being decoded in full.
    """
    if isinstance(source, (bytes, bytearray)):
        if max_bytes is not None and len(source) > max_bytes:
            raise AudioError("too_large", f"{len(source)} bytes > limit {max_bytes}")
        if len(source) == 0:
            raise AudioError("empty", "zero-length input")
        fh: str | BinaryIO = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        size = Path(source).stat().st_size
        if max_bytes is not None and size > max_bytes:
            raise AudioError("too_large", f"{size} bytes > limit {max_bytes}")
        if size == 0:
            raise AudioError("empty", "zero-length file")
        fh = str(source)
    else:
        fh = source
    try:
        with sf.SoundFile(fh) as f:
            sr, channels = int(f.samplerate), int(f.channels)
            if max_seconds is None:
                data = f.read(dtype="float32", always_2d=True)
            else:
                # libsndfile says SF_COUNT_MAX when the header gives no length (a streamed FLAC): read, bounded.
                unknown = f.frames >= UNKNOWN_FRAMES
                if not unknown and f.frames > max_seconds * sr:
                    raise AudioError("too_long", f"{f.frames / sr:.1f} s by its header, above the limit of {max_seconds:g} s")
                if sr * channels > MAX_SAMPLES_PER_SECOND:
                    raise AudioError("too_many_samples", f"{channels} channels at {sr} Hz: more than "
                                                         f"{MAX_SAMPLES_PER_SECOND} samples per second")
                data = f.read(frames=int(max_seconds * sr) + 1, dtype="float32", always_2d=True)
                if data.shape[0] > max_seconds * sr:
                    said = "gave no length" if unknown else f"said {f.frames / sr:.1f} s"
                    raise AudioError("too_long", f"more than the limit of {max_seconds:g} s (its header {said})")
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        # libsndfile names an in-memory input by its repr (a memory address): say "input" instead, so the
        # same bad file always gives the same message and the caller can name the file.
        message = _OBJECT_REPR.sub("input", str(exc).strip()) or type(exc).__name__
        raise AudioError("undecodable", message) from exc
    if data.shape[0] == 0:
        raise AudioError("empty", "no samples")
    if not np.isfinite(data).all():
        raise AudioError("undecodable", "non-finite samples")
    mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    return DecodedAudio(resample(mono, sr, target_sr), target_sr, sr, channels)


def resample(samples: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited resampling through torchaudio; a no-op when the rates already match."""
    if orig_sr == target_sr:
        return np.ascontiguousarray(samples, dtype=np.float32)
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), orig_sr, target_sr)
    return out.numpy().astype(np.float32, copy=False)


def rms_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale; -inf for digital silence."""
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else float("-inf")


def clipping_ratio(samples: np.ndarray, level: float) -> float:
    """Share of samples at or beyond ``level`` (full scale = 1.0)."""
    return float(np.mean(np.abs(samples) >= level)) if len(samples) else 0.0


def write(path: str | Path, samples: np.ndarray, sample_rate: int) -> None:
    """Write 16-bit PCM (FLAC or WAV by suffix): lossless for what models consume, half the size as FLAC."""
    p = Path(path)
    subtype = "PCM_16"
    tmp = p.with_name(p.name + ".tmp")
    sf.write(str(tmp), np.clip(samples, -1.0, 1.0), sample_rate, subtype=subtype, format=p.suffix.lstrip(".").upper())
    tmp.replace(p)
