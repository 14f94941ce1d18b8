"""Per-clip audio statistics read from the files themselves, not from what the manifest claims.

The manifest's ``sample_rate`` and ``duration_s`` are written by ingest; a file replaced by hand, a
partial DVC pull or a bad remote would leave them stale. Decoding every file is the only way to know
what training will actually read, so the validate step (and anything that wants level statistics,
such as drift monitoring) builds its table here.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
from tqdm import tqdm

from cacara import audio
from cacara.manifest import Clip

log = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_MISSING = "missing"
STATUS_BAD_PATH = "bad_path"
STATUS_UNDECODABLE = "undecodable"  # the same reason cacara.audio.AudioError gives

# Digital silence has an RMS of -inf dBFS, which JSON cannot carry and pandas comparisons treat oddly;
# the smallest positive float32 amplitude is the quietest level a decoded file can express anyway.
SILENCE_FLOOR_DBFS = 20.0 * math.log10(float(np.finfo(np.float32).tiny))

COLUMNS = ("clip_id", "split", "audio_path", "audio_status", "audio_error", "file_sample_rate",
           "file_channels", "duration_s", "rms_dbfs", "clipping_ratio")


@dataclass
class AudioStats:
    """What one file really holds; the numeric fields are None when it could not be decoded."""

    clip_id: str
    split: str
    audio_path: str
    audio_status: str
    audio_error: str | None = None
    file_sample_rate: int | None = None
    file_channels: int | None = None
    duration_s: float | None = None
    rms_dbfs: float | None = None
    clipping_ratio: float | None = None


def _escapes_dataset(rel: str) -> bool:
    """Lexical check only: DVC checkouts may symlink files into its cache, so resolving would lie."""
    norm = os.path.normpath(rel)
    return os.path.isabs(rel) or norm == os.pardir or norm.startswith(os.pardir + os.sep)


def clip_audio_stats(clip: Clip, dataset_dir: str | Path, sample_rate: int, max_file_bytes: int,
                     clip_level: float) -> AudioStats:
    """Decode one clip at ``audio.sample_rate`` and measure it.

    Level statistics are taken after the conversion to mono at the target rate because that is the
    signal every later step consumes. Never raises for bad audio: the status says what went wrong so
    one bad file cannot hide the others.
    """
    base = AudioStats(clip_id=str(clip.clip_id), split=str(clip.split), audio_path=str(clip.audio_path),
                      audio_status=STATUS_OK)
    if not isinstance(clip.audio_path, str) or not clip.audio_path or _escapes_dataset(clip.audio_path):
        base.audio_status, base.audio_error = STATUS_BAD_PATH, "audio_path must be relative to the dataset folder"
        return base
    path = Path(dataset_dir) / clip.audio_path
    if not path.is_file():
        base.audio_status, base.audio_error = STATUS_MISSING, f"no file at {clip.audio_path}"
        return base
    try:
        decoded = audio.decode(path, sample_rate, max_bytes=max_file_bytes)
    except audio.AudioError as exc:
        base.audio_status, base.audio_error = exc.reason, exc.detail
        return base
    except OSError as exc:  # unreadable file (permissions, I/O error): as unusable as a corrupt one
        base.audio_status, base.audio_error = STATUS_UNDECODABLE, str(exc)
        return base
    base.file_sample_rate = decoded.orig_sample_rate
    base.file_channels = decoded.orig_channels
    base.duration_s = decoded.duration_s
    base.rms_dbfs = max(audio.rms_dbfs(decoded.samples), SILENCE_FLOOR_DBFS)
    base.clipping_ratio = audio.clipping_ratio(decoded.samples, clip_level)
    return base


def audio_stats_table(clips: Iterable[Clip], dataset_dir: str | Path, sample_rate: int, max_file_bytes: int,
                      clip_level: float, progress: bool = True) -> pd.DataFrame:
    """One row per manifest row (duplicates included), in manifest order, with a progress bar."""
    clips = list(clips)
    rows = [asdict(clip_audio_stats(c, dataset_dir, sample_rate, max_file_bytes, clip_level))
            for c in tqdm(clips, desc="decode audio", unit="clip", disable=not progress)]
    # Object dtype keeps integers as integers (8000, not 8000.0, in a report) and None as null.
    df = pd.DataFrame(rows, columns=list(COLUMNS), dtype=object)
    for col in ("duration_s", "rms_dbfs", "clipping_ratio"):
        df[col] = df[col].astype(float)
    bad = df[df["audio_status"] != STATUS_OK]
    if len(bad):
        log.info("audio: %d of %d files unusable (%s)", len(bad), len(df),
                 ", ".join(f"{k}={v}" for k, v in bad["audio_status"].value_counts().items()))
    return df
