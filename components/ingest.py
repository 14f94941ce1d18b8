"""Step 1, ingest: any supported source -> the canonical 16 kHz mono dataset plus a quarantine report.

Unusable clips are never dropped silently: each goes to ``quarantine.json`` with its reason, and the
run fails when more than ``ingest.max_bad_fraction`` of the rows are bad (a sign the source itself is
wrong, which no model should be trained on quietly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
from tqdm import tqdm

from cacara import audio
from cacara.manifest import (MANIFEST_NAME, QUARANTINE_NAME, SPLITS, Clip, assign_split, read_manifest,
                             split_fractions, write_manifest)
from cacara.sources import BadRow, SourceRow, read_source

log = logging.getLogger(__name__)

AUDIO_DIR = "audio"
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class IngestFailed(RuntimeError):
    """Too large a share of the source was unusable; the reports are written before this is raised."""


@dataclass
class Quarantined:
    row: int
    clip_id: str
    reason: str
    detail: str


@dataclass
class IngestResult:
    format: str
    out_dir: Path
    clips: list[Clip]
    quarantined: list[Quarantined]
    dropped_captions: list[dict[str, Any]] = field(default_factory=list)
    reused: int = 0

    @property
    def total_rows(self) -> int:
        return len(self.clips) + len(self.quarantined)

    @property
    def bad_fraction(self) -> float:
        return len(self.quarantined) / self.total_rows if self.total_rows else 1.0

    def summary(self) -> str:
        reasons = Counter(q.reason for q in self.quarantined)
        splits = Counter(c.split for c in self.clips)
        langs = {lang for c in self.clips for lang in c.captions}
        lines = [f"ingest ({self.format}): {len(self.clips)} clips kept, {len(self.quarantined)} quarantined "
                 f"of {self.total_rows} rows ({self.bad_fraction:.1%}); {self.reused} reused unchanged",
                 "  splits: " + ", ".join(f"{s}={splits.get(s, 0)}" for s in SPLITS),
                 f"  languages: {len(langs)}; audio: {sum(c.duration_s for c in self.clips):.1f} s"]
        if reasons:
            lines.append("  quarantine: " + ", ".join(f"{r}={n}" for r, n in sorted(reasons.items())))
        if self.dropped_captions:
            lines.append(f"  blank captions removed: {len(self.dropped_captions)}")
        return "\n".join(lines)


def _file_name(clip_id: str, audio_format: str) -> str:
    """A filesystem-safe, collision-free name: ids from Clotho carry spaces, AudioCaps ids are fine."""
    safe = SAFE_NAME.sub("_", clip_id).strip("._") or "clip"
    if safe != clip_id:
        safe = f"{safe}-{hashlib.sha256(clip_id.encode()).hexdigest()[:8]}"
    return f"{AUDIO_DIR}/{safe}.{audio_format}"


def _clean_captions(row: SourceRow, dropped: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Strip whitespace; record (never silently drop) blank captions."""
    out: dict[str, list[str]] = {}
    for lang, caps in row.captions.items():
        for i, text in enumerate(caps):
            text = " ".join(text.split())
            if text:
                out.setdefault(lang, []).append(text)
            else:
                dropped.append({"clip_id": row.clip_id, "language": lang, "index": i})
    return out


def _previous(out_dir: Path) -> dict[str, Clip]:
    """Rows of an earlier run, for skipping unchanged clips (ingest must be quick to re-run)."""
    try:
        return {c.clip_id: c for c in read_manifest(out_dir)} if (out_dir / MANIFEST_NAME).exists() else {}
    except ValueError:
        return {}


def _settings_key(params: dict[str, Any]) -> str:
    keys = {"audio": params["audio"], "format": params["ingest"]["audio_format"]}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _convert(row: SourceRow, captions: dict[str, list[str]], out_dir: Path, params: dict[str, Any],
             previous: dict[str, Clip]) -> tuple[Clip, bool]:
    """Decode, check and write one clip; raises AudioError with the quarantine reason."""
    a = params["audio"]
    try:
        with fsspec.open(row.audio_url, "rb") as fh:
            raw = fh.read(int(a["max_file_bytes"]) + 1)
    except FileNotFoundError as exc:
        raise audio.AudioError("missing_file", row.audio_url) from exc
    except OSError as exc:
        raise audio.AudioError("missing_file", f"{row.audio_url}: {exc}") from exc
    source_hash = hashlib.sha256(raw).hexdigest()
    settings = _settings_key(params)
    rel = _file_name(row.clip_id, params["ingest"]["audio_format"])
    split = assign_split(row.clip_id, int(params["split"]["seed"]), split_fractions(params))
    prev = previous.get(row.clip_id)
    if (prev is not None and prev.extra.get("source_sha256") == source_hash
            and prev.extra.get("settings") == settings and (out_dir / prev.audio_path).exists()):
        clip = Clip(**{**prev.__dict__, "captions": captions, "split": split,
                       "source": row.source or prev.source, "license": row.license or prev.license})
        return clip, True
    decoded = audio.decode(raw, int(a["sample_rate"]), max_bytes=int(a["max_file_bytes"]))
    if decoded.duration_s < float(a["min_duration_s"]):
        raise audio.AudioError("too_short", f"{decoded.duration_s:.2f} s < {a['min_duration_s']} s")
    if decoded.duration_s > float(a["max_duration_s"]):
        raise audio.AudioError("too_long", f"{decoded.duration_s:.2f} s > {a['max_duration_s']} s")
    level = audio.rms_dbfs(decoded.samples)
    if level < float(a["silence_rms_dbfs"]):
        raise audio.AudioError("silent", f"RMS {level:.1f} dBFS < {a['silence_rms_dbfs']} dBFS")
    audio.write(out_dir / rel, decoded.samples, decoded.sample_rate)
    sha = hashlib.sha256((out_dir / rel).read_bytes()).hexdigest()
    extra = dict(row.extra, source_sha256=source_hash, settings=settings)
    # A canonical source was already resampled once: keep what the original recording was.
    orig_sr = int(extra.pop("orig_sample_rate", decoded.orig_sample_rate))
    orig_ch = int(extra.pop("orig_channels", decoded.orig_channels))
    return Clip(row.clip_id, rel, captions, round(decoded.duration_s, 4), decoded.sample_rate,
                orig_sr, orig_ch, row.source or "unknown",
                row.license or "unknown", split, sha, extra), False


def ingest(source: str | Path, out_dir: str | Path, params: dict[str, Any], fmt: str | None = None) -> IngestResult:
    """Read ``source`` (folder, file or fsspec URL) and write the canonical dataset to ``out_dir``.

    Idempotent: clips whose source bytes and audio settings are unchanged are not decoded again, and
    files of clips no longer in the source are removed so the folder always equals the manifest.
    """
    out = Path(out_dir)
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    lang = params["ingest"]["training_language"]
    fmt_used, rows = read_source(str(source), fmt or params["data"]["format"], lang)
    previous = _previous(out)
    clips: list[Clip] = []
    quarantined: list[Quarantined] = []
    dropped: list[dict[str, Any]] = []
    seen: set[str] = set()
    reused = 0
    for row in tqdm(rows, desc="ingest", unit="clip", disable=None):
        if isinstance(row, BadRow):
            quarantined.append(Quarantined(row.row, row.clip_id, row.reason, row.detail))
            continue
        if row.clip_id in seen:
            quarantined.append(Quarantined(row.row, row.clip_id, "duplicate_id", "clip_id seen in an earlier row"))
            continue
        seen.add(row.clip_id)
        captions = _clean_captions(row, dropped)
        if not captions.get(lang):
            quarantined.append(Quarantined(row.row, row.clip_id, "empty_caption",
                                           f"no non-empty caption in the training language {lang!r}"))
            continue
        try:
            clip, was_reused = _convert(row, captions, out, params, previous)
        except audio.AudioError as exc:
            quarantined.append(Quarantined(row.row, row.clip_id, exc.reason, exc.detail))
            continue
        reused += was_reused
        clips.append(clip)
    keep = {c.audio_path for c in clips}
    for stale in (out / AUDIO_DIR).iterdir():
        if f"{AUDIO_DIR}/{stale.name}" not in keep:
            stale.unlink()
    write_manifest(clips, out)
    result = IngestResult(fmt_used, out, clips, quarantined, dropped, reused)
    report = {"source": str(source), "format": fmt_used, "total_rows": result.total_rows,
              "kept": len(clips), "bad_fraction": round(result.bad_fraction, 6),
              "max_bad_fraction": params["ingest"]["max_bad_fraction"],
              "quarantined": [q.__dict__ for q in quarantined], "dropped_captions": dropped}
    (out / QUARANTINE_NAME).write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    log.info("%s", result.summary())
    if result.bad_fraction > float(params["ingest"]["max_bad_fraction"]):
        raise IngestFailed(f"{len(quarantined)} of {result.total_rows} rows quarantined "
                           f"({result.bad_fraction:.1%} > ingest.max_bad_fraction "
                           f"{params['ingest']['max_bad_fraction']:.1%}); see {out / QUARANTINE_NAME}")
    return result
