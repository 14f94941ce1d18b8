"""The canonical dataset contract every step reads: a folder of 16 kHz mono files plus ``manifest.jsonl``.

One JSON object per clip (JSONL, because captions are a nested ``{language: [caption, ...]}`` map and
several captions per language are allowed, as in Clotho). Paths are relative to the manifest so a
dataset folder can move, be pushed to a DVC remote, or be read through fsspec.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

MANIFEST_NAME = "manifest.jsonl"
QUARANTINE_NAME = "quarantine.json"
SPLITS = ("train", "val", "test")

# Field name -> (type, required). The validate step checks the same table.
SCHEMA: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "clip_id": (str, True),
    "audio_path": (str, True),
    "captions": (dict, True),
    "duration_s": ((int, float), True),
    "sample_rate": (int, True),
    "orig_sample_rate": (int, True),
    "orig_channels": (int, True),
    "source": (str, True),
    "license": (str, True),
    "split": (str, True),
    "sha256": (str, True),
}


@dataclass
class Clip:
    """One row of the canonical manifest."""

    clip_id: str
    audio_path: str
    captions: dict[str, list[str]]
    duration_s: float
    sample_rate: int
    orig_sample_rate: int
    orig_channels: int
    source: str
    license: str
    split: str
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["extra"]:
            d.pop("extra")
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Clip":
        missing = [k for k, (_, req) in SCHEMA.items() if req and k not in d]
        if missing:
            raise ValueError(f"manifest row {d.get('clip_id', '?')!r} lacks fields {missing}")
        known = {k: d[k] for k in SCHEMA}
        return cls(**known, extra=d.get("extra", {}))

    def captions_in(self, language: str) -> list[str]:
        return list(self.captions.get(language, []))


def assign_split(clip_id: str, seed: int, fractions: dict[str, float]) -> str:
    """Deterministic split from a hash of (seed, clip_id).

    Hashing instead of shuffling keeps every existing clip in its split when clips are added or
    removed, so a test clip never leaks into training as the dataset grows.
    """
    total = sum(fractions[s] for s in SPLITS)
    if total <= 0:
        raise ValueError("split fractions must sum to a positive number")
    digest = hashlib.sha256(f"{seed}:{clip_id}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    acc = 0.0
    for name in SPLITS:
        acc += fractions[name] / total
        if u < acc:
            return name
    return SPLITS[-1]


def read_manifest(path: str | Path) -> list[Clip]:
    """Read a canonical manifest (the file, or the dataset folder that holds it)."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    clips = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                clips.append(Clip.from_json(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as exc:
                raise ValueError(f"{p}:{lineno}: not a canonical manifest row: {exc}") from exc
    return clips


def write_manifest(clips: Iterable[Clip], path: str | Path) -> Path:
    """Write atomically (temp file + rename) so an interrupted run never leaves half a manifest."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    tmp = p.with_suffix(p.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for clip in sorted(clips, key=lambda c: c.clip_id):
            fh.write(json.dumps(clip.to_json(), ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(p)
    return p


def iter_captions(clips: Iterable[Clip]) -> Iterator[tuple[str, str, int, str]]:
    """Yield (clip_id, language, index, caption) for every caption of every clip."""
    for clip in clips:
        for lang in sorted(clip.captions):
            for i, text in enumerate(clip.captions[lang]):
                yield clip.clip_id, lang, i, text


def languages(clips: Iterable[Clip]) -> list[str]:
    return sorted({lang for c in clips for lang in c.captions})
