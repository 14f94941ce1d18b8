"""What the BentoML service does, without BentoML: search an index in any language, by text or by example,
classify zero-shot, embed; every limit checked with a message. cacara/service.py is the thin HTTP shell.

One packaged model folder (the BentoML model store entry the package step writes) holds ``model/`` (the
trained model and its ONNX export), ``index/`` (the vectors, faiss and the clips) and ``package.json``
(provenance, the quality gate and the service limits, all recorded at packaging time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from cacara import audio
from cacara.config import ServeSection

if TYPE_CHECKING:
    from cacara.embed import Embedder
    from components.drift import DriftLog

log = logging.getLogger(__name__)


class RequestRefused(ValueError):
    """A request the service will not serve; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class Hit:
    clip_id: str
    caption: str
    score: float

    def to_json(self) -> dict[str, Any]:
        return {"clip_id": self.clip_id, "caption": self.caption, "score": round(self.score, 6)}


class Batcher:
    """Adaptive batching for requests that carry one item each (``embed_audio``: one upload, one vector).

    BentoML batches an API whose argument is the batch (a list in, a list out), which fits
    ``embed_text`` but not a contract of one file in, one vector out. Here each request queues its item;
    one worker takes everything queued at that moment (up to ``max_batch_size``) and runs it in one
    thread, so an idle service answers at once and a busy one answers in batches as large as the queue.
    ``prepare`` (decoding an upload) runs in that same thread, item by item: one thread hop per request
    instead of two, and an item it refuses fails only its own request, never the batch it came with."""

    def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], max_batch_size: int,
                 prepare: Callable[[Any], Any] | None = None):
        self.fn, self.max_batch_size, self.prepare = fn, int(max_batch_size), prepare
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the last batches run (/info shows them)

    async def submit(self, item: Any) -> Any:
        if self._queue is None or self._worker is None or self._worker.done():
            import contextvars

            self._queue = asyncio.Queue()
            # In a context of its own: not the first request's, which it would otherwise keep alive.
            self._worker = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    def _process(self, items: list[Any]) -> list[tuple[bool, Any]]:
        """(True, row) or (False, exception) per item, in order; runs in the batch's thread."""
        outcomes: list[tuple[bool, Any] | None] = [None] * len(items)
        ready: list[tuple[int, Any]] = []
        for i, item in enumerate(items):
            if self.prepare is None:
                ready.append((i, item))
                continue
            try:
                ready.append((i, self.prepare(item)))
            except Exception as exc:  # this request's own error
                outcomes[i] = (False, exc)
        if ready:
            try:
                rows = self.fn([value for _, value in ready])
                if len(rows) != len(ready):  # never leave a request waiting for a row that will not come
                    raise RuntimeError(f"the batch of {len(ready)} gave {len(rows)} rows")
                for (i, _), row in zip(ready, rows):
                    outcomes[i] = (True, row)
            except Exception as exc:  # every request of the batch gets the error, the worker goes on
                for i, _ in ready:
                    outcomes[i] = (False, exc)
        return outcomes  # type: ignore[return-value]

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [(item, fut) for item, fut in batch if not fut.cancelled()]  # the client went away
            if not batch:
                continue
            self.batches = (self.batches + [len(batch)])[-100:]
            try:
                outcomes = await asyncio.to_thread(self._process, [item for item, _ in batch])
            except Exception as exc:  # the thread could not run at all
                outcomes = [(False, exc)] * len(batch)
            for (_, fut), (ok, value) in zip(batch, outcomes):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)


def load_embedder(model_dir: str | Path) -> "Embedder":
    """The model, loaded with one torch thread when torch then computes nothing (audio on onnxruntime,
    text towers in numpy and C). Once torch has run a parallel op on 2 threads (loading the model runs
    some), one caption through e5 took 22 ms instead of 7 for the rest of the process, and setting the
    count back later does not undo it (measured on a 2-core Intel Xeon, AVX-512; batches of 32 cost the
    same either way)."""
    import torch

    from cacara.embed import Embedder
    from model.inference import TorchAudioEmbedder

    from model.text_encoders import HF_PREFIX

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    embedder = None
    try:
        embedder = Embedder.load(model_dir)
    finally:
        # Torch embeds the audio (CUDA, hf: encoders) or a text tower (hf:): it gets its threads back.
        if embedder is None or isinstance(embedder.audio, TorchAudioEmbedder) or \
                HF_PREFIX in str(embedder.model.config.get("text_encoder", "")):
            torch.set_num_threads(threads)
    return embedder


class SearchEngine:
    """A packaged model folder loaded once: the embedder, the index and the limits."""

    def __init__(self, root: str | Path, limits: ServeSection, name: str = "", drift_log: "DriftLog | None" = None):
        from components.index import ClipIndex

        self.root = Path(root)
        self.name = name or self.root.name
        self.limits = limits
        self.drift_log = drift_log
        self.drift_log_errors, self._drift_log_warned = 0, float("-inf")
        self.record = json.loads((self.root / "package.json").read_text())
        self.embedder = load_embedder(self.root / "model")
        self.index = ClipIndex(self.root / "index")
        if self.index.record["dim"] != self.embedder.dim:
            raise ValueError(f"index vectors are {self.index.record['dim']}-d, the model's {self.embedder.dim}-d")
        config = json.loads((self.root / "model" / "config.json").read_text())
        self.training_language = str(config.get("params", {}).get("training_language", "en"))
        value = config.get("temperature")  # the trained softmax temperature, read once (classify uses it)
        self.temperature = float(value) if value and math.isfinite(float(value)) and float(value) > 0 else 0.05

    # ---------------------------------------------------------------------------------------- inputs

    def decode_upload(self, path: str | Path, name: str = "upload") -> audio.DecodedAudio:
        """An uploaded file as 16 kHz mono, or RequestRefused: too large (413), not audio, too long (400)."""
        size = Path(path).stat().st_size
        if size > self.limits.max_upload_bytes:
            raise RequestRefused(f"{name}: {size} bytes, above the limit of {self.limits.max_upload_bytes}", 413)
        try:
            decoded = audio.decode(path, self.embedder.sample_rate, max_bytes=self.limits.max_upload_bytes,
                                   max_seconds=self.limits.max_audio_seconds)
        except audio.AudioError as exc:
            if exc.reason in ("too_long", "too_many_samples"):
                raise RequestRefused(f"{name}: too much audio: {exc.detail}") from None
            raise RequestRefused(f"{name}: not usable audio ({exc.reason}: {exc.detail})") from None
        return decoded

    def _k(self, k: int) -> int:
        if not 1 <= int(k) <= self.limits.max_k:
            raise RequestRefused(f"k must be between 1 and {self.limits.max_k}, got {k}")
        return int(k)

    def _texts(self, texts: Sequence[str], what: str) -> list[str]:
        texts = list(texts)
        if not texts:
            raise RequestRefused(f"no {what} given")
        if len(texts) > self.limits.max_texts:
            raise RequestRefused(f"{len(texts)} {what}, above the limit of {self.limits.max_texts}")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise RequestRefused(f"{what} {i} is empty")
            if len(t) > self.limits.max_text_chars:
                raise RequestRefused(f"{what} {i} has {len(t)} characters, above the limit of "
                                     f"{self.limits.max_text_chars}")
        return texts

    # ------------------------------------------------------------------------------------ operations

    def embed_texts(self, texts: Sequence[str], language: str | None = None, what: str = "texts") -> np.ndarray:
        return self.embedder.embed_texts(self._texts(texts, what), language)

    def embed_waves(self, waves: Sequence[np.ndarray | audio.DecodedAudio], endpoint: str = "embed_audio") -> np.ndarray:
        """Rows for waveforms, or for decoded uploads: those are also recorded in the drift log (when on)."""
        rows = self.embedder.embed_waveforms([w.samples if isinstance(w, audio.DecodedAudio) else w for w in waves])
        if self.drift_log is not None:
            for wave, row in zip(waves, rows):
                if isinstance(wave, audio.DecodedAudio):
                    try:
                        self.drift_log.append(wave, row, endpoint)
                    except Exception as exc:  # noqa: BLE001  a full or lost log volume never fails a request
                        self._drift_log_failed(exc)
        return rows

    def _drift_log_failed(self, exc: Exception) -> None:
        """Said once a minute at most: every request of a busy service would repeat it."""
        import time

        now = time.monotonic()
        self.drift_log_errors += 1
        if now - self._drift_log_warned > 60:
            self._drift_log_warned = now
            log.warning("drift log: %s (%d records lost so far); requests are answered all the same",
                        exc, self.drift_log_errors)

    def _hits(self, rows: list[tuple[int, float]], language: str | None) -> list[Hit]:
        hits = []
        for row, score in rows:
            clip = self.index.clips[row]
            captions = clip["captions"]
            caption = (captions.get(language) or captions.get(self.training_language)
                       or next(iter(captions.values()), [""]))[0]
            hits.append(Hit(clip["clip_id"], caption, score))
        return hits

    def search_text(self, query: str, k: int, language: str | None = None) -> list[Hit]:
        """Top-``k`` clips for a query in any language; ``language`` (optional) picks the caption shown."""
        vector = self.embed_texts([query], language, what="query")
        return self._hits(self.index.search(vector, self._k(k))[0], language)

    def search_audio(self, wave: np.ndarray | audio.DecodedAudio, k: int) -> list[Hit]:
        """Query by example: the clips nearest an uploaded clip."""
        k = self._k(k)
        return self._hits(self.index.search(self.embed_waves([wave], "search_audio"), k)[0], None)

    def classify(self, wave: np.ndarray | audio.DecodedAudio, labels: Sequence[str],
                 language: str | None = None) -> list[dict[str, float]]:
        """Zero-shot: each label's cosine with the clip, and a softmax over the labels at the model's
        trained temperature; best first."""
        labels = self._texts(labels, "labels")
        if len(set(labels)) != len(labels):
            raise RequestRefused("labels must be distinct")
        clip = self.embed_waves([wave], "classify")[0]
        scores = self.embedder.embed_texts(labels, language) @ clip
        logits = scores / self.temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-scores, kind="stable")
        return [{"label": labels[i], "score": round(float(scores[i]), 6), "probability": round(float(probs[i]), 6)}
                for i in order]

    def info(self) -> dict[str, Any]:
        config = self.embedder.model.config
        return {"name": "cacara", "model": self.name,
                "version": __import__("cacara").__version__, "data_md5": self.record.get("data_md5", ""),
                "text_encoder": config["text_encoder"], "audio_encoder": config["audio_encoder"],
                "dim": self.embedder.dim, "index_size": len(self.index), "index_kind": self.index.record["kind"],
                "quality_gate": self.record.get("quality_gate"), "limits": self.limits.model_dump(),
                "drift_log": str(self.drift_log.path) if self.drift_log is not None else None,
                "drift_log_errors": self.drift_log_errors + int(getattr(self.drift_log, "errors", 0)),
                "drift_log_dropped": int(getattr(self.drift_log, "dropped", 0))}
