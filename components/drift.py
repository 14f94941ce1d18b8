"""Drift: is a new batch of audio like the audio the model was trained on?

A **reference profile** is written when a model is trained (``profile_reference``): one row per clip of the
training split with the features below, plus the clip's audio embedding by that model. A **current batch**
is a newly ingested dataset (before the next training run: the pipeline's gate) or the log of what the
service received (``DriftLog``, one JSON line per audio request: the features and the embedding, never the
audio or any text). ``check_drift`` compares the two with an Evidently 0.7 Report and writes it as HTML
(for a person) and as a JSON summary (for the gate and for scripts).

Columns (one place: :data:`FEATURE_COLUMNS`):

* from the audio, measured on the 16 kHz mono signal every later step reads: ``duration_s``,
  ``rms_dbfs``, ``silence_ratio`` (share of 25-ms frames below ``audio.silence_rms_dbfs``),
  ``clipping_ratio`` (share of samples at ``validate.clip_level``); and what the file was before
  conversion: ``orig_sample_rate``, ``orig_channels`` (categories);
* from the captions (datasets only): ``caption_chars`` and ``caption_language`` (what lingua hears in the
  training-language caption);
* from the embeddings: their ``emb_norm``, their cosine to the reference centroid (``emb_centroid_cos``)
  and their coordinates on the first principal components of the reference (``emb_pc1``...), next to
  Evidently's ``EmbeddingsDrift`` on the vectors themselves.

The gate: a column drifts when its test's p-value is below ``drift.alpha`` divided by the number of columns
tested (Bonferroni: with a dozen columns, a per-column 0.05 would flag one column in half of all batches
drawn from the very same audio); the embeddings drift when their score passes
``drift.embeddings_threshold``. Any of those fails the gate; ``drift.policy`` says whether that stops the
pipeline (``fail``) or only warns.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import logging.handlers
import math
import os
import shutil
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm import tqdm

from cacara import audio
from cacara.config import DriftConfig, DriftProfileConfig
from cacara.manifest import Clip, read_manifest

log = logging.getLogger(__name__)

AUDIO_COLUMNS = ("duration_s", "rms_dbfs", "silence_ratio", "clipping_ratio", "bandwidth_hz")
#: Numbers, not labels: with categories, one clip at a rate the other side lacks (the demo has 22254 Hz
#: once) fails a chi-square test by itself; as numbers, a batch of 8-kHz telephone audio still stands out.
SOURCE_COLUMNS = ("orig_sample_rate", "orig_channels")
CAPTION_COLUMNS = ("caption_chars", "caption_language")  # datasets only: the service logs no text
EMBEDDING_SUMMARY = ("emb_norm", "emb_centroid_cos")
CATEGORICAL = frozenset({"caption_language"})
#: The share of spectral energy under ``bandwidth_hz``: audio band-limited on the way (8-kHz telephone
#: audio resampled back up) keeps its rate and level, and loses everything above 4 kHz.
BANDWIDTH_ENERGY = 0.99
BANDWIDTH_FRAME = 512
#: Every column a report can hold, in report order (the principal components follow EMBEDDING_SUMMARY).
FEATURE_COLUMNS = AUDIO_COLUMNS + SOURCE_COLUMNS + CAPTION_COLUMNS + EMBEDDING_SUMMARY
EMBEDDINGS_NAME = "audio_embedding"
SILENCE_FRAME_S = 0.025

PROFILE_TABLE = "profile.parquet"
PROFILE_EMBEDDINGS = "embeddings.npy"
PROFILE_RECORD = "profile.json"
PROFILE_MODEL = "model"
REPORT_HTML = "drift_report.html"
SUMMARY_JSON = "drift.json"
LOG_PREFIX = "requests-"


class DriftInputError(ValueError):
    """A batch that cannot be compared (empty, too small, malformed); the message says which and why."""


class DriftGateFailed(RuntimeError):
    """The current batch drifted and the policy is ``fail``; ``summary`` holds the whole result."""

    def __init__(self, summary: dict[str, Any]):
        self.summary = summary
        super().__init__(f"drift gate failed: drifted {', '.join(summary['drifted']) or '(none)'} "
                         f"(report: {summary.get('report_html', '')})")


# ----------------------------------------------------------------------------------------------- features

def silence_ratio(samples: np.ndarray, sample_rate: int, threshold_dbfs: float) -> float:
    """Share of 25-ms frames whose RMS is below ``threshold_dbfs``; a clip shorter than a frame is one frame."""
    frame = max(1, int(round(SILENCE_FRAME_S * sample_rate)))
    n = max(1, len(samples) // frame)
    x = np.asarray(samples[: n * frame], dtype=np.float64)
    if len(x) < frame:
        x = np.pad(x, (0, frame - len(x)))
    rms = np.sqrt(np.mean(np.square(x.reshape(n, frame)), axis=1))
    return float(np.mean(rms < 10.0 ** (threshold_dbfs / 20.0)))


def bandwidth_hz(samples: np.ndarray, sample_rate: int) -> float:
    """The frequency under which ``BANDWIDTH_ENERGY`` of the clip's energy lies (Hann frames of 512); 0
    for digital silence."""
    n = BANDWIDTH_FRAME
    x = np.asarray(samples, dtype=np.float32)
    if len(x) < n:
        x = np.pad(x, (0, n - len(x)))
    frames = x[: len(x) // n * n].reshape(-1, n) * np.hanning(n).astype(np.float32)
    power = np.square(np.abs(np.fft.rfft(frames, axis=1))).sum(axis=0, dtype=np.float64)
    total = float(power.sum())
    if total <= 0:
        return 0.0
    k = int(np.searchsorted(np.cumsum(power) / total, BANDWIDTH_ENERGY))
    return float(k * sample_rate / n)


def audio_features(decoded: audio.DecodedAudio, silence_dbfs: float, clip_level: float) -> dict[str, Any]:
    """The audio columns of one clip or upload: the service and the dataset path share this."""
    from components.audio_stats import SILENCE_FLOOR_DBFS

    samples = decoded.samples
    return {"duration_s": round(decoded.duration_s, 4),
            "rms_dbfs": round(max(audio.rms_dbfs(samples), SILENCE_FLOOR_DBFS), 3),
            "silence_ratio": round(silence_ratio(samples, decoded.sample_rate, silence_dbfs), 4),
            "clipping_ratio": round(audio.clipping_ratio(samples, clip_level), 6),
            "bandwidth_hz": round(bandwidth_hz(samples, decoded.sample_rate), 1),
            "orig_sample_rate": int(decoded.orig_sample_rate), "orig_channels": int(decoded.orig_channels)}


@dataclass
class Batch:
    """One side of a comparison: a row of features per clip and the clips' embeddings, row for row."""

    features: pd.DataFrame
    embeddings: np.ndarray
    source: str
    kind: str  # "dataset", "profile" or "log"
    model: str = ""  # sha256 of the audio branch that made the embeddings ("" when unknown)
    notes: list[str] = field(default_factory=list)
    measured_with: dict[str, Any] = field(default_factory=dict)  # a profile's or a log's settings (measured_with())

    def __post_init__(self) -> None:
        if len(self.features) != len(self.embeddings):
            raise DriftInputError(f"{self.source}: {len(self.features)} feature rows but "
                                  f"{len(self.embeddings)} embeddings")


def _caption(clip: Clip, language: str) -> str:
    texts = clip.captions.get(language) or []
    return texts[0] if texts else ""


def dataset_batch(dataset_dir: str | Path, model_dir: str | Path, config: DriftProfileConfig,
                  splits: Sequence[str] = ()) -> Batch:
    """Features and embeddings of the clips of a canonical dataset (only ``splits`` when given)."""
    from cacara.embed import DECODE_CHUNK, Embedder
    from components.validate import language_detector

    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "manifest.jsonl").is_file():
        raise DriftInputError(f"{dataset_dir}: not a canonical dataset (no manifest.jsonl)")
    try:
        clips = [c for c in read_manifest(dataset_dir) if not splits or c.split in splits]
    except (ValueError, KeyError, TypeError) as exc:
        raise DriftInputError(f"{dataset_dir}: malformed manifest.jsonl: {exc}") from None
    if not clips:
        raise DriftInputError(f"{dataset_dir}: no clips{' in splits ' + ','.join(splits) if splits else ''}")
    embedder = Embedder.load(model_dir)
    rows: list[dict[str, Any]] = []
    embeddings = np.zeros((len(clips), embedder.dim), dtype=np.float32)
    bar = tqdm(total=len(clips), desc="drift features", unit="clip", disable=None)
    for start in range(0, len(clips), DECODE_CHUNK):  # bounded memory: decoded audio of one chunk at a time
        waves = []
        for clip in clips[start:start + DECODE_CHUNK]:
            try:
                decoded = audio.decode(dataset_dir / clip.audio_path, embedder.sample_rate)
            except (audio.AudioError, OSError) as exc:
                raise DriftInputError(f"{dataset_dir}: clip {clip.clip_id} ({clip.audio_path}) cannot be read: "
                                      f"{exc}") from None
            row = audio_features(decoded, config.silence_rms_dbfs, config.clip_level)
            # The stored file is always 16 kHz mono: what the source was is what ingest recorded.
            row.update(orig_sample_rate=int(clip.orig_sample_rate), orig_channels=int(clip.orig_channels),
                       clip_id=clip.clip_id, caption_chars=len(_caption(clip, config.training_language)))
            rows.append(row)
            waves.append(decoded.samples)
        embeddings[start:start + len(waves)] = embedder.embed_waveforms(waves)
        bar.update(len(waves))
    bar.close()
    captions = [_caption(c, config.training_language) for c in clips]
    detected = language_detector().detect_languages_in_parallel_of(captions)
    # Two categories, the training language or not: lingua's guesses on three-word captions scatter over
    # dozens of languages ("A dog barks" reads as Danish), and one rare guess on either side would fail a
    # chi-square test; the share of captions heard as another language is what moves.
    for row, lang in zip(rows, detected):
        code = lang.iso_code_639_1.name.lower() if lang is not None else None
        row["caption_language"] = config.training_language if code == config.training_language else "other"
    return Batch(pd.DataFrame(rows), embeddings, str(dataset_dir), "dataset", model=model_sha(model_dir))


def model_sha(model_dir: str | Path) -> str:
    """The sha256 of a model folder's ONNX export: which model made a batch's embeddings."""
    from model.inference import ONNX_SHA_KEY

    config = json.loads((Path(model_dir) / "config.json").read_text())
    return str(config.get(ONNX_SHA_KEY, ""))


# ------------------------------------------------------------------------------------------------ profile

def profile_reference(dataset_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
                      config: DriftProfileConfig) -> dict[str, Any]:
    """The reference a later batch is compared with: the training split, embedded by the trained model."""
    batch = dataset_batch(dataset_dir, model_dir, config, splits=config.reference_splits)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # The model that made the embeddings travels with them: a new batch is embedded the same way.
    if (out / PROFILE_MODEL).exists():
        shutil.rmtree(out / PROFILE_MODEL)
    shutil.copytree(model_dir, out / PROFILE_MODEL)
    batch.features.to_parquet(out / PROFILE_TABLE, index=False)
    np.save(out / PROFILE_EMBEDDINGS, batch.embeddings.astype(np.float32))
    record = {"clips": len(batch.features), "splits": list(config.reference_splits), "model_sha256": batch.model,
              "dim": int(batch.embeddings.shape[1]), "columns": list(batch.features.columns),
              "measured_with": measured_with(config)}
    (out / PROFILE_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    log.info("drift reference: %d clips of %s", len(batch.features), ",".join(config.reference_splits))
    return record


def measured_with(config: DriftProfileConfig) -> dict[str, Any]:
    """The settings a feature value depends on: a batch measured otherwise is not comparable."""
    return {"silence_rms_dbfs": config.silence_rms_dbfs, "clip_level": config.clip_level,
            "training_language": config.training_language}


def profile_settings(path: str | Path) -> dict[str, Any]:
    """How a saved profile's features were measured (the service measures its uploads the same way)."""
    return json.loads((Path(path) / PROFILE_RECORD).read_text())["measured_with"]


def is_profile(path: str | Path) -> bool:
    return (Path(path) / PROFILE_RECORD).is_file()


def load_profile(path: str | Path) -> Batch:
    path = Path(path)
    try:
        record = json.loads((path / PROFILE_RECORD).read_text())
        features = pd.read_parquet(path / PROFILE_TABLE)
        embeddings = np.load(path / PROFILE_EMBEDDINGS)
        model, settings = str(record.get("model_sha256", "")), dict(record.get("measured_with") or {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DriftInputError(f"{path}: not a readable drift profile ({type(exc).__name__}: {exc})") from None
    return Batch(features, embeddings, str(path), "profile", model=model, measured_with=settings)


# ---------------------------------------------------------------------------------------- the serving log

class _RaisingRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Raises what went wrong (a full or lost volume) instead of printing a traceback per record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging's name)
        raise


class DriftLog:
    """Appends one JSON line per audio request to ``folder/requests-<host>.jsonl``, rotated by size
    (``logging.handlers.RotatingFileHandler``: at most ``max_bytes`` a file and ``backups`` old files, so
    the log never outgrows ``(backups + 1) * max_bytes``). One file per host: pods sharing a volume never
    write the same file. Holds features and the embedding only: no audio, no text.

    Off the request's path: :meth:`append` queues the decoded clip and a thread of its own measures it
    (2 ms for a 10-s clip: 11% of its embedding time) and writes the line. A full queue (the disk far
    behind) drops the record and counts it, so the log never slows or holds up an answer."""

    QUEUE = 64  # records waiting to be written: at most this many decoded clips held in memory

    def __init__(self, folder: str | Path, max_bytes: int, backups: int, silence_dbfs: float, clip_level: float,
                 model: str = ""):
        import queue

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{LOG_PREFIX}{socket.gethostname()}.jsonl"
        self.silence_dbfs, self.clip_level, self.model = silence_dbfs, clip_level, model
        self._handler = _RaisingRotatingFileHandler(self.path, maxBytes=max_bytes, backupCount=backups,
                                                    encoding="utf-8")
        self.errors, self.dropped, self._warned = 0, 0, float("-inf")
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUE)
        self._thread = threading.Thread(target=self._write_forever, name="drift-log", daemon=True)
        self._thread.start()

    def append(self, decoded: audio.DecodedAudio, embedding: np.ndarray, endpoint: str) -> None:
        import queue

        when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
        try:
            self._queue.put_nowait((when, decoded, np.asarray(embedding, dtype=np.float32), endpoint))
        except queue.Full:
            self.dropped += 1
            self._warn(f"{self.dropped} records dropped: the log's writer is behind")

    def record(self, when: str, decoded: audio.DecodedAudio, embedding: np.ndarray, endpoint: str) -> str:
        """The JSON line of one request."""
        import orjson

        return orjson.dumps({"time": when, "endpoint": endpoint, "model": self.model,
                             "measured_with": {"silence_rms_dbfs": self.silence_dbfs, "clip_level": self.clip_level},
                             **audio_features(decoded, self.silence_dbfs, self.clip_level),
                             "embedding": embedding}, option=orjson.OPT_SERIALIZE_NUMPY).decode()

    def _write_forever(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._handler.emit(logging.makeLogRecord({"msg": self.record(*item), "args": None}))
            except Exception as exc:  # noqa: BLE001  a full or lost volume: counted, said once a minute
                self.errors += 1
                self._warn(f"{exc} ({self.errors} records lost so far)")
            finally:
                self._queue.task_done()

    def _warn(self, message: str) -> None:
        import time

        now = time.monotonic()
        if now - self._warned > 60:
            self._warned = now
            log.warning("drift log %s: %s; requests are answered all the same", self.path, message)

    def flush(self) -> None:
        """Wait until every queued record is written."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._handler.close()


def _log_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file() and p.name.startswith(LOG_PREFIX))
    raise DriftInputError(f"{path}: no such file or folder")


def read_log(path: str | Path, max_bad_fraction: float = 0.1, model: str = "", max_rows: int = 0) -> Batch:
    """The records of a serving log (a file, or a folder of rotated files). A line that is not a whole
    record (a truncated last line after a crash, a foreign line) is skipped and counted; more than
    ``max_bad_fraction`` of such lines, or none usable, is an error naming the first bad one. With
    ``model`` (an ONNX sha256), records another model served (before a rollout) are left out and counted.
    With ``max_rows``, a uniform sample of that many records is kept while reading (reservoir), so memory
    stays bounded however long the log."""
    path = Path(path)
    rng = np.random.default_rng(0)
    other_models: dict[str, int] = {}
    settings_seen: set[str] = set()
    rows: list[dict[str, Any]] = []
    vectors: list[np.ndarray] = []
    bad: list[str] = []
    total, kept, models = 0, 0, set()
    measured: dict[str, Any] = {}
    for file in _log_files(path):
        with open(file, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                total += 1
                try:
                    record = json.loads(raw)
                    row = {c: record[c] for c in AUDIO_COLUMNS + SOURCE_COLUMNS}
                    for c in AUDIO_COLUMNS + SOURCE_COLUMNS:
                        if isinstance(row[c], bool) or not isinstance(row[c], (int, float)) or not math.isfinite(row[c]):
                            raise ValueError(f"{c} is {row[c]!r}, not a number")
                        row[c] = float(row[c])
                    raw_vector = record["embedding"]
                    if not isinstance(raw_vector, list) or not raw_vector:
                        raise ValueError("embedding is not a list of numbers")
                    vector = np.asarray(raw_vector, dtype=np.float32)  # 4 bytes a value, not a Python float's 24
                    if vector.ndim != 1 or not np.isfinite(vector).all():
                        raise ValueError("embedding is not a list of finite numbers")
                    if vectors and len(vector) != len(vectors[0]):
                        raise ValueError(f"embedding has {len(vector)} values, earlier records {len(vectors[0])}")
                except Exception as exc:  # noqa: BLE001  any line of any content: counted, never a crash
                    bad.append(f"{file.name}:{number}: {type(exc).__name__}: {exc}"[:300])
                    continue
                served_by = str(record.get("model", ""))
                if model and served_by != model:
                    other_models[served_by] = other_models.get(served_by, 0) + 1
                    continue
                models.add(served_by)
                settings = record.get("measured_with")
                if isinstance(settings, dict):
                    settings_seen.add(json.dumps(settings, sort_keys=True))
                    measured.update(settings)
                kept += 1
                if not max_rows or len(rows) < max_rows:
                    rows.append(row)
                    vectors.append(vector)
                else:  # reservoir sampling: every record kept with the same chance
                    j = int(rng.integers(0, kept))
                    if j < max_rows:
                        rows[j], vectors[j] = row, vector
    if not rows:
        first = f" (first bad line: {bad[0]})" if bad else ""
        others = f"; {sum(other_models.values())} records of other models" if other_models else ""
        raise DriftInputError(f"{path}: no usable request records{' of model ' + model[:12] if model else ''} "
                              f"in {total} lines{first}{others}")
    if len(settings_seen) > 1:
        raise DriftInputError(f"{path}: records measured with different settings ({sorted(settings_seen)}): "
                              "not one batch")
    if bad:
        share = len(bad) / total
        message = f"{path}: skipped {len(bad)} of {total} lines that are not whole records (first: {bad[0]})"
        if share > max_bad_fraction:
            raise DriftInputError(message + f": more than {max_bad_fraction:.0%} of the log")
        log.warning(message)
    notes = [f"{len(bad)} of {total} log lines skipped (not whole records)"] if bad else []
    if other_models:
        notes.append(f"{sum(other_models.values())} records of other models left out "
                     f"({', '.join(m[:12] or '?' for m in sorted(other_models))})")
    if max_rows and kept > len(rows):
        notes.append(f"log {path}: a random {len(rows)} of its {kept} records compared (drift.max_rows)")
    if len(models) > 1:
        notes.append(f"the log holds records of {len(models)} models: {sorted(models)}")
    return Batch(pd.DataFrame(rows), np.stack(vectors), str(path), "log",
                 model=next(iter(models)) if len(models) == 1 else "", notes=notes, measured_with=measured)


def load_batch(path: str | Path, model_dir: str | Path | None, config: DriftProfileConfig,
               splits: Sequence[str] = (), model: str = "", max_rows: int = 0) -> Batch:
    """A profile folder, a canonical dataset folder (embedded by ``model_dir``) or a serving log (only the
    records ``model`` served, when given)."""
    path = Path(path)
    if is_profile(path):
        return load_profile(path)
    if (path / "manifest.jsonl").is_file():
        if model_dir is None:
            raise DriftInputError(f"{path} is a dataset: its embeddings need a model (--model, or a reference "
                                  "profile that holds its model)")
        return dataset_batch(path, model_dir, config, splits)
    return read_log(path, model=model, max_rows=max_rows)


def reference_model(reference: str | Path) -> Path | None:
    """The model a saved profile holds (profile_reference copies it there), or None."""
    folder = Path(reference) / PROFILE_MODEL
    return folder if is_profile(reference) and (folder / "config.json").is_file() else None


# ------------------------------------------------------------------------------------------------ compare

def embedding_summaries(reference: np.ndarray, current: np.ndarray, components: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Norm, cosine to the reference centroid and the first principal components of the reference, for
    both sides (fitted on the reference only, so a current batch cannot move its own yardstick)."""
    mean = reference.mean(axis=0)
    centroid = mean / max(float(np.linalg.norm(mean)), 1e-12)
    k = max(0, min(components, reference.shape[0] - 1, reference.shape[1]))
    basis = np.linalg.svd(reference - mean, full_matrices=False)[2][:k] if k else np.zeros((0, reference.shape[1]))

    def table(x: np.ndarray) -> pd.DataFrame:
        norms = np.linalg.norm(x, axis=1)
        out = {"emb_norm": np.round(norms, 4),
               "emb_centroid_cos": (x @ centroid) / np.maximum(norms, 1e-12)}
        projected = (x - mean) @ basis.T if k else np.zeros((len(x), 0))
        for i in range(k):
            out[f"emb_pc{i + 1}"] = projected[:, i]
        return pd.DataFrame(out)

    return table(reference), table(current)


def _at_most(batch: Batch, rows: int, notes: list[str]) -> Batch:
    """A seeded random sample of ``rows`` clips of a larger batch: the embeddings test's kernel grows with
    the square of the rows (MMD over 20k logged requests would take gigabytes), and K-S over tens of
    thousands of rows calls any difference, however small, significant."""
    if len(batch.features) <= rows:
        return batch
    keep = np.sort(np.random.default_rng(0).choice(len(batch.features), rows, replace=False))
    notes.append(f"{batch.kind} {batch.source}: a random {rows} of its {len(batch.features)} clips compared "
                 "(drift.max_rows)")
    return Batch(batch.features.iloc[keep].reset_index(drop=True), batch.embeddings[keep], batch.source, batch.kind,
                 model=batch.model, notes=batch.notes, measured_with=batch.measured_with)


def _check_sizes(reference: Batch, current: Batch, min_rows: int) -> None:
    for side in (reference, current):
        if len(side.features) < min_rows:
            raise DriftInputError(f"{side.source}: {len(side.features)} clips, fewer than drift.min_rows "
                                  f"({min_rows}): too few to test")
    if reference.embeddings.shape[1] != current.embeddings.shape[1]:
        raise DriftInputError(f"{current.source}: embeddings of {current.embeddings.shape[1]} values, the "
                              f"reference's {reference.embeddings.shape[1]}: another model's space")
    # Evidently's embeddings plot runs t-SNE at perplexity 30 over both sides together.
    if len(reference.features) + len(current.features) <= 31:
        raise DriftInputError(f"{len(reference.features)} reference and {len(current.features)} current clips: "
                              "at least 32 together are needed")


def _frames(reference: Batch, current: Batch, config: DriftConfig) -> tuple[pd.DataFrame, pd.DataFrame, list[str], list[str]]:
    ref_summary, cur_summary = embedding_summaries(reference.embeddings, current.embeddings, config.drift.pca_components)
    pcs = [c for c in ref_summary.columns if c.startswith("emb_pc")]
    wanted = [c for c in (*FEATURE_COLUMNS, *pcs) if c in config.drift.columns or (c.startswith("emb_pc") and "emb_pc" in config.drift.columns)]
    frames = []
    for side, summary in ((reference, ref_summary), (current, cur_summary)):
        df = pd.concat([side.features.reset_index(drop=True), summary], axis=1)
        emb = pd.DataFrame(side.embeddings, columns=[f"e{i}" for i in range(side.embeddings.shape[1])])
        frames.append((df, emb))
    # Caption columns exist only where both sides are datasets (or profiles of datasets).
    columns = [c for c in wanted if c in frames[0][0].columns and c in frames[1][0].columns]
    skipped = [c for c in wanted if c not in columns]
    ref_df = pd.concat([frames[0][0][columns], frames[0][1]], axis=1)
    cur_df = pd.concat([frames[1][0][columns], frames[1][1]], axis=1)
    for df in (ref_df, cur_df):
        for c in columns:
            df[c] = df[c].astype(str) if c in CATEGORICAL else pd.to_numeric(df[c], errors="coerce").astype(float)
    for side, df in (("reference", ref_df), ("current", cur_df)):
        empty = [c for c in columns if c not in CATEGORICAL and df[c].notna().sum() == 0]
        if empty:
            raise DriftInputError(f"{side} batch: no values in {', '.join(empty)}")
    return ref_df, cur_df, columns, skipped


def _embeddings_method(config: DriftConfig):
    from evidently.metrics.embeddings import DistanceDriftMethod, MMDDriftMethod, ModelDriftMethod

    return {"mmd": MMDDriftMethod, "model": ModelDriftMethod, "distance": DistanceDriftMethod}[config.drift.embeddings_method]()


def compare(reference: Batch, current: Batch, config: DriftConfig):
    """The Evidently snapshot and its summary (see :func:`summarise`)."""
    from threadpoolctl import threadpool_limits

    _check_sizes(reference, current, config.drift.min_rows)
    notes = [*reference.notes, *current.notes]
    reference, current = (_at_most(b, config.drift.max_rows, notes) for b in (reference, current))
    ref_df, cur_df, columns, skipped = _frames(reference, current, config)
    if not columns:
        raise DriftInputError(f"none of drift.columns ({', '.join(config.drift.columns)}) is on both sides "
                              f"({reference.kind} against {current.kind})")
    per_column = config.drift.alpha / len(columns)
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import EmbeddingsDrift
    from evidently.presets import DataDriftPreset
    from evidently.tests import lte

    emb_cols = [c for c in ref_df.columns if c not in columns]
    definition = DataDefinition(numerical_columns=[c for c in columns if c not in CATEGORICAL],
                                categorical_columns=[c for c in columns if c in CATEGORICAL],
                                embeddings={EMBEDDINGS_NAME: emb_cols})
    # Tests with p-values, always: the threshold is one. Evidently's defaults would pick chi-square for a
    # number with 3 to 5 distinct values in the reference, where one value the other side lacks (a single
    # clip at 22254 Hz) fails the test by itself, and above 1000 reference rows distances, not p-values.
    report = Report([DataDriftPreset(columns=columns, threshold=per_column, num_method="ks", cat_method="chisquare"),
                     EmbeddingsDrift(embeddings_name=EMBEDDINGS_NAME, drift_method=_embeddings_method(config),
                                     tests=[lte(config.drift.embeddings_threshold)])], include_tests=True)
    # The embeddings plot's t-SNE takes seconds to minutes with a thread per core on a busy machine, and
    # a quarter of a second on one thread.
    with threadpool_limits(1), np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a constant column (emb_norm of unit vectors) divides by 0
        snapshot = report.run(current_data=Dataset.from_pandas(cur_df, data_definition=definition),
                              reference_data=Dataset.from_pandas(ref_df, data_definition=definition))
    summary = summarise(snapshot.dict(), columns, per_column, config)
    summary.update(reference={"source": reference.source, "kind": reference.kind, "clips": len(ref_df),
                              "model_sha256": reference.model},
                   current={"source": current.source, "kind": current.kind, "clips": len(cur_df),
                            "model_sha256": current.model},
                   columns_not_compared=skipped, notes=notes)
    if reference.model and current.model and reference.model != current.model:
        summary["notes"].append("the current embeddings come from another model than the reference's")
    return snapshot, summary


def summarise(snapshot: dict[str, Any], columns: Sequence[str], per_column: float, config: DriftConfig) -> dict[str, Any]:
    """Per column: its test, score, threshold and whether it drifted; the embeddings' score and test; the
    drifted columns (embeddings included, as ``audio_embedding``) and whether the gate passed."""
    metrics = {m["id"]: m for m in snapshot["metrics"]}
    out_columns: dict[str, Any] = {}
    embeddings: dict[str, Any] = {}
    share = None
    for test in snapshot["tests"]:
        metric = metrics.get(test["metric_config"]["metric_id"], {})
        cfg = metric.get("config", {})
        kind = str(cfg.get("type", ""))
        status = str(test["status"]).split(".")[-1]
        # Anything but SUCCESS fails the gate: a test Evidently could not run (ERROR) passes nothing.
        if kind.endswith("ValueDrift"):
            out_columns[cfg["column"]] = {"test": cfg.get("method"), "score": metric.get("value"),
                                          "threshold": cfg.get("threshold"), "status": status,
                                          "drifted": status != "SUCCESS"}
        elif kind.endswith("EmbeddingsDrift"):
            embeddings = {"method": config.drift.embeddings_method, "score": metric.get("value"),
                          "threshold": config.drift.embeddings_threshold, "status": status,
                          "drifted": status != "SUCCESS"}
        elif kind.endswith("DriftedColumnsCount"):
            share = metric.get("value", {}).get("share")
    drifted = [c for c in columns if out_columns.get(c, {}).get("drifted")]
    if embeddings.get("drifted"):
        drifted.append(EMBEDDINGS_NAME)
    missing = [c for c in columns if c not in out_columns]
    if missing or not embeddings:
        raise RuntimeError(f"the Evidently report lacks tests for {missing or [EMBEDDINGS_NAME]}")
    return {"passed": not drifted, "policy": config.drift.policy, "drifted": drifted,
            "drifted_share": len(drifted) / (len(columns) + 1), "evidently_drifted_share": share,
            "alpha": config.drift.alpha, "per_column_threshold": per_column, "columns": out_columns,
            "embeddings": embeddings}


# --------------------------------------------------------------------------------------------------- step

def check_drift(reference: str | Path, current: str | Path, out_dir: str | Path, config: DriftConfig,
                model_dir: str | Path | None = None) -> dict[str, Any]:
    """The drift step: compare, write ``drift_report.html`` and ``drift.json`` into ``out_dir``, and raise
    DriftGateFailed when the batch drifted and ``drift.policy`` is ``fail`` (the report is written first)."""
    profile_config = config.profile
    model_dir = model_dir or reference_model(reference)
    ref = load_batch(reference, model_dir, profile_config, config.drift.reference_splits)
    notes = []
    if ref.measured_with:  # a saved profile: a new batch is measured as it was, whatever these params say
        ours = measured_with(profile_config)
        if any(ours.get(k) != v for k, v in ref.measured_with.items()):
            notes.append(f"measured as the reference was ({ref.measured_with}), not with these params ({ours})")
        profile_config = profile_config.model_copy(update=ref.measured_with)
    cur = load_batch(current, model_dir, profile_config, config.drift.current_splits, model=ref.model,
                     max_rows=config.drift.max_rows)
    differ = {k: (v, ref.measured_with.get(k)) for k, v in cur.measured_with.items()
              if k in ref.measured_with and ref.measured_with[k] != v}
    if differ:
        raise DriftInputError(f"{cur.source} was measured with other settings than the reference: "
                              + ", ".join(f"{k} {a} (reference {b})" for k, (a, b) in differ.items()))
    cur.notes = [*notes, *cur.notes]
    snapshot, summary = compare(ref, cur, config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html = out / REPORT_HTML
    snapshot.save_html(str(html))  # Evidently writes only when given a str
    summary["report_html"] = str(html)
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=1, sort_keys=True, default=str))
    verdict = "passed" if summary["passed"] else f"drifted: {', '.join(summary['drifted'])}"
    log.info("drift %s (%d reference clips, %d current); report %s", verdict, summary["reference"]["clips"],
             summary["current"]["clips"], html)
    if not summary["passed"]:
        if config.drift.policy == "fail":
            raise DriftGateFailed(summary)
        log.warning("drift.policy is warn: going on although %s", verdict)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for a terminal: the verdict, then each column's score against its threshold."""
    lines = [f"drift: {'PASSED' if summary['passed'] else 'DRIFTED: ' + ', '.join(summary['drifted'])} "
             f"({summary['reference']['clips']} reference clips, {summary['current']['clips']} current; "
             f"policy {summary['policy']})"]
    for name, c in summary["columns"].items():
        lines.append(f"  {name:18s} {str(c['test']):22s} p={float(c['score']):.3g} "
                     f"{'DRIFT' if c['drifted'] else 'ok'}")
    e = summary["embeddings"]
    lines.append(f"  {EMBEDDINGS_NAME:18s} {e['method']:22s} score={float(e['score']):.3g} (<= {e['threshold']}) "
                 f"{'DRIFT' if e['drifted'] else 'ok'}")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    lines.append(f"  report: {summary.get('report_html', '')}")
    return "\n".join(lines)
