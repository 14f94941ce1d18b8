"""Caption embeddings from a frozen text encoder, cached by content hash.

The text tower never changes in CACARA, so each caption is embedded once, ever: the training loop
and the evaluation read vectors from this cache and never run the text encoder. The key is
sha256(encoder name, text), so editing one caption re-embeds only that caption.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

log = logging.getLogger(__name__)

SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def text_key(encoder_name: str, text: str) -> str:
    return hashlib.sha256(f"{encoder_name}\0{text}".encode("utf-8")).hexdigest()


class TextEmbeddingCache:
    """An on-disk map text -> L2-normalised vector for one encoder (``<dir>/<encoder>.npz``)."""

    def __init__(self, directory: str | Path, encoder_name: str, load: bool = True):
        """``load=False`` starts empty even when the file exists (a composite's rows are re-assembled
        from its towers' caches on every run, so rows written by an older rule never linger)."""
        self.encoder_name = encoder_name
        self.path = Path(directory) / f"{SAFE.sub('_', encoder_name)}.npz"
        self._index: dict[str, int] = {}
        self._emb = np.zeros((0, 0), dtype=np.float32)
        #: Widths of a composite's tower blocks, in order (None: one tower); text centring needs them.
        self.blocks: list[int] | None = None
        if load and self.path.exists():
            with np.load(self.path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                if meta.get("encoder") != encoder_name:
                    raise ValueError(f"{self.path} holds {meta.get('encoder')!r}, not {encoder_name!r}")
                self._emb = data["emb"].astype(np.float32)
                self._index = {k: i for i, k in enumerate(data["keys"].tolist())}
                self.blocks = meta.get("blocks")
            if self.blocks is None and _is_composite(encoder_name):
                raise ValueError(f"{self.path} was written before composite towers recorded their blocks (an "
                                 "older composite rule): run the embed_text step again to re-assemble it")

    def __len__(self) -> int:
        return len(self._index)

    @property
    def dim(self) -> int:
        return int(self._emb.shape[1]) if self._emb.size else 0

    def missing(self, texts: Iterable[str]) -> list[str]:
        seen: dict[str, None] = {}
        for t in texts:
            if text_key(self.encoder_name, t) not in self._index:
                seen.setdefault(t, None)
        return list(seen)

    def add(self, texts: Sequence[str], encoder) -> int:
        """Embed the texts not cached yet with ``encoder``; returns how many were new."""
        todo = self.missing(texts)
        if not todo:
            return 0
        if encoder.name != self.encoder_name:
            raise ValueError(f"cache for {self.encoder_name!r} given encoder {encoder.name!r}")
        blocks = getattr(encoder, "blocks", None)
        if self._index and blocks != self.blocks:
            raise ValueError(f"{self.path}: cached rows have tower blocks {self.blocks}, {encoder.name} gives {blocks}")
        self.blocks = blocks
        vecs = np.asarray(encoder.encode(todo), dtype=np.float32)
        if vecs.shape[0] != len(todo):
            raise RuntimeError(f"{encoder.name} returned {vecs.shape[0]} rows for {len(todo)} texts")
        start = len(self._index)
        self._emb = vecs if not self._emb.size else np.concatenate([self._emb, vecs])
        for i, t in enumerate(todo):
            self._index[text_key(self.encoder_name, t)] = start + i
        return len(todo)

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors in the order given; a text not in the cache is an error (run embed_text first)."""
        try:
            rows = [self._index[text_key(self.encoder_name, t)] for t in texts]
        except KeyError:
            missing = self.missing(texts)
            raise KeyError(f"{len(missing)} texts not embedded by {self.encoder_name} "
                           f"(run the embed_text step: `cacara embed-captions`), e.g. {missing[:3]}") from None
        return self._emb[rows] if rows else np.zeros((0, self.dim), dtype=np.float32)

    def save(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = np.array(sorted(self._index, key=self._index.get), dtype="U64")
        meta = json.dumps({"encoder": self.encoder_name, "dim": self.dim, "count": len(self), "blocks": self.blocks})
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, keys=keys, emb=self._emb, meta=np.array(meta))
        tmp.replace(self.path)
        return self.path


def _is_composite(name: str) -> bool:
    from model.text_encoders import composite_parts

    return composite_parts(name) is not None


class CachedComposite:
    """A composite tower that reads its towers' rows from their caches instead of running them, so
    re-weighting towers costs no text encoding."""

    def __init__(self, name: str, parts: Sequence[tuple[str, float]], caches: Sequence[TextEmbeddingCache]):
        self.name, self.parts, self.caches = name, list(parts), list(caches)
        self.blocks = [cache.dim for cache in self.caches]

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        from model.text_encoders import combine_towers

        texts = list(texts)
        return combine_towers(self.parts, [cache.get(texts) for cache in self.caches], texts)


def encoder_for_cache(name: str, part_cache: Callable[[str], TextEmbeddingCache]):
    """What fills ``name``'s cache: a composite from ``part_cache(tower)`` of each of its towers (which
    must already hold the texts), any other tower run live."""
    from model.text_encoders import build_text_encoder, composite_parts

    parts = composite_parts(name)
    return CachedComposite(name, parts, [part_cache(t) for t, _ in parts]) if parts else build_text_encoder(name)
