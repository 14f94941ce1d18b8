"""Mean-centring of the frozen text tower's vectors, per language or overall.

Why: multilingual towers are anisotropic and place every sentence of a language near a shared
language direction (e5: unrelated sentences at cosine 0.77; Libovický et al. 2020, "On the language
neutrality of pre-trained multilingual representations", remove it by subtracting each language's
mean). Retrieval scores a query t against clips a_j as t . a_j; a shared component c_L of the query
adds c_L . a_j, a bias that depends on the clip and not on the query: every query of language L
leans toward the same clips. The audio branch trains against English captions only, so whatever
it learns along c_en turns into noise for every other language. Subtracting the language's mean
from the query (and the English mean from the training targets) leaves the part of the vector that
carries meaning, which is the part shared across languages.

The means are statistics of the frozen tower over unpaired text (the captions of the training and
validation splits, no audio involved), stored with the trained model so the CLI and any service
centre queries exactly as training and evaluation did. A language without a mean of its own falls
back to its base language (pt-BR -> pt), then to the mean over all languages.

Composite towers (model/text_encoders.py) leave a tower's block at zero for a text the tower cannot
read. Centring must keep it there: subtracting the block's mean would put back the same vector into
every such query, exactly the clip-dependent bias centring exists to remove. So with the block
widths known, a block is centred only where it is non-zero, and its mean is taken over those rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

MODES = ("none", "global", "language")
GLOBAL_KEY = "*"
FILE = "text_centroids.npz"


class TextCentroids:
    """Mean vectors of one text tower: one per language plus the overall mean (``GLOBAL_KEY``)."""

    def __init__(self, mode: str, vectors: dict[str, np.ndarray] | None = None, blocks: Sequence[int] | None = None):
        if mode not in MODES:
            raise ValueError(f"text centring {mode!r}: expected one of {MODES}")
        self.mode = mode
        self.vectors = {k: np.asarray(v, dtype=np.float32) for k, v in (vectors or {}).items()}
        #: Tower block widths of a composite tower (None: one block, the whole row).
        self.blocks = [int(b) for b in blocks] if blocks else None
        if mode != "none" and GLOBAL_KEY not in self.vectors:
            raise ValueError(f"text centring {mode!r} needs an overall mean (key {GLOBAL_KEY!r})")
        widths = {key: v.shape[-1] for key, v in self.vectors.items()}
        if self.blocks and any(w != sum(self.blocks) for w in widths.values()):
            raise ValueError(f"text centring: means of {sorted(set(widths.values()))} dims, "
                             f"tower blocks sum to {sum(self.blocks)}")

    @classmethod
    def compute(cls, mode: str, texts_by_language: dict[str, Sequence[str]], cache, min_texts: int) -> TextCentroids:
        """Means of the cached vectors; languages with fewer than ``min_texts`` texts get none of their own."""
        if mode == "none":
            return cls("none")
        all_texts = [t for texts in texts_by_language.values() for t in texts]
        if not all_texts:
            raise ValueError("text centring needs some captions to estimate the mean from")
        blocks = getattr(cache, "blocks", None)
        vectors = {GLOBAL_KEY: _block_mean(cache.get(all_texts), blocks)}
        if mode == "language":
            for lang, texts in texts_by_language.items():
                if len(texts) >= min_texts:
                    vectors[lang] = _block_mean(cache.get(list(texts)), blocks)
        return cls(mode, vectors, blocks)

    def vector(self, language: str | None) -> np.ndarray | None:
        """The mean to subtract for ``language`` (None: the language is unknown)."""
        if self.mode == "none":
            return None
        if self.mode == "language" and language:
            for key in (language, language.split("-")[0]):
                if key in self.vectors:
                    return self.vectors[key]
        return self.vectors[GLOBAL_KEY]

    def apply(self, embeddings: np.ndarray, language: str | None = None) -> np.ndarray:
        """Centred, re-normalised rows (unchanged when the mode is ``none``)."""
        emb = np.asarray(embeddings, dtype=np.float32)
        c = self.vector(language)
        if c is None:
            return emb
        out = (emb - c) * _present(emb, self.blocks)
        norms = np.linalg.norm(out, axis=-1, keepdims=True)
        return (out / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)

    def save(self, directory: str | Path) -> tuple[Path, str]:
        """Write ``text_centroids.npz``; returns its path and sha256 (recorded in the model's config)."""
        path = Path(directory) / FILE
        keys = sorted(self.vectors)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mode=np.array(self.mode), languages=np.array(keys, dtype=str),
                 vectors=np.stack([self.vectors[k] for k in keys]) if keys else np.zeros((0, 0), np.float32),
                 blocks=np.array(self.blocks or [], dtype=np.int64))
        tmp.replace(path)
        return path, hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def load(cls, directory: str | Path, sha256: str | None) -> TextCentroids:
        """Read what :meth:`save` wrote, refusing a file that does not match the recorded checksum."""
        path = Path(directory) / FILE
        if sha256 is None:
            return cls("none")
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing, but the model's config.json records its sha256: "
                                    "the model folder is incomplete")
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise ValueError(f"{path} does not match its recorded sha256 (corrupt or replaced)")
        with np.load(path, allow_pickle=False) as data:
            keys = [str(k) for k in data["languages"]]
            blocks = data["blocks"].tolist() if "blocks" in data.files else None
            return cls(str(data["mode"]), dict(zip(keys, data["vectors"])), blocks)


def _present(rows: np.ndarray, blocks: Sequence[int] | None) -> np.ndarray:
    """1 where a row's tower block holds a vector, 0 where the composite left the block out; per element."""
    if not blocks:
        return np.ones_like(rows)
    if rows.shape[-1] != sum(blocks):
        raise ValueError(f"text centring: rows have {rows.shape[-1]} dims, tower blocks sum to {sum(blocks)}")
    starts = np.cumsum([0, *blocks[:-1]])
    block_present = np.logical_or.reduceat(rows != 0, starts, axis=-1)
    return np.repeat(block_present, blocks, axis=-1).astype(rows.dtype)


def _block_mean(rows: np.ndarray, blocks: Sequence[int] | None) -> np.ndarray:
    """Mean row; with tower blocks, each block's mean over the rows where that block is present."""
    present = _present(rows, blocks)
    return (rows * present).sum(axis=0) / np.maximum(present.sum(axis=0), 1.0)


def texts_by_language(clips: Iterable, splits: Sequence[str]) -> dict[str, list[str]]:
    """Caption texts per language from the clips of ``splits``: the unpaired text the means come from."""
    out: dict[str, list[str]] = {}
    for clip in clips:
        if clip.split in splits:
            for lang, caps in clip.captions.items():
                out.setdefault(lang, []).extend(caps)
    return out
