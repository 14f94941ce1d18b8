"""Step 1, ingest: any supported source -> the canonical 16 kHz mono dataset plus a quarantine report.

Unusable clips are never dropped silently: each goes to ``quarantine.json`` with its reason, and the
run fails when more than ``ingest.max_bad_fraction`` of the rows are bad (a sign the source itself is
wrong, which no model should be trained on quietly).

Large sources are ingested in shards (each shard takes the clips whose id hashes to it) and the shards
merged into one dataset (:func:`merge_shards`), which is then the dataset one shard would have written.
An earlier dataset is an explicit input (``previous``): clips whose source bytes and settings are
unchanged are taken from it instead of being decoded again; the output folder itself is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cacara import audio
from cacara.config import IngestConfig
from cacara.files import atomic_write_text, exclusive_output
from cacara.manifest import MANIFEST_NAME, QUARANTINE_NAME, SPLITS, Clip, assign_split, read_manifest, write_manifest
from cacara.sources import BadRow, Confinement, Escaped, SourceRow, read_source

log = logging.getLogger(__name__)

AUDIO_DIR = "audio"
SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
MAX_NAME = 120  # characters of a clip id kept in its file name; a hash of the whole id follows


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
    """A filesystem-safe, collision-free name: ids from Clotho carry spaces, AudioCaps ids are fine, and a
    hostile id (``../../evil``, a 10 000-character one) must neither escape the folder nor exceed the
    255-byte name limit of common filesystems."""
    safe = SAFE_NAME.sub("_", clip_id).strip("._")[:MAX_NAME] or "clip"
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


def _previous(previous: Path | None) -> dict[str, Clip]:
    """Rows of an earlier dataset, for taking unchanged clips over instead of decoding them again."""
    if previous is None or not (previous / MANIFEST_NAME).exists():
        return {}
    try:
        return {c.clip_id: c for c in read_manifest(previous)}
    except ValueError:
        log.warning("earlier dataset %s has an unreadable manifest: every clip is decoded again", previous)
        return {}


def _settings_key(config: IngestConfig) -> str:
    keys = {"audio": config.audio.model_dump(), "format": config.ingest.audio_format}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _unchanged(path: Path, sha256: str) -> bool:
    """The earlier dataset's file is still the one its manifest describes: a run killed before it wrote its
    manifest (or one with other settings) may have replaced it under the same name."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _place(src: Path, dest: Path) -> None:
    """Put an unchanged clip's file from the earlier dataset into the new one (a hard link where possible)."""
    if src.resolve() == dest.resolve():
        return
    dest.unlink(missing_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


READ_CHUNK = 1 << 20


def _read_at_most(fh, limit: int) -> bytes:
    """Up to ``limit`` bytes in 1 MiB reads: ``read(limit)`` would allocate the whole limit (100 MiB) up front
    for every file, however small (measured: benchmarks/results/resource_bounds.md)."""
    chunks, size = [], 0
    while size < limit:
        chunk = fh.read(min(READ_CHUNK, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _convert(row: SourceRow, captions: dict[str, list[str]], out_dir: Path, config: IngestConfig,
             previous: dict[str, Clip], previous_dir: Path | None, confinement: Confinement) -> tuple[Clip, bool]:
    """Decode, check and write one clip; raises AudioError with the quarantine reason."""
    a = config.audio
    try:
        with confinement.open(row.audio_url) as fh:
            raw = _read_at_most(fh, a.max_file_bytes + 1)
    except Escaped as exc:
        raise audio.AudioError("symlink_escape", str(exc)) from exc
    except FileNotFoundError as exc:
        raise audio.AudioError("missing_file", row.audio_url) from exc
    except OSError as exc:
        raise audio.AudioError("missing_file", f"{row.audio_url}: {exc}") from exc
    source_hash = hashlib.sha256(raw).hexdigest()
    settings = _settings_key(config)
    rel = _file_name(row.clip_id, config.ingest.audio_format)
    split = assign_split(row.clip_id, config.split.seed, config.split.fractions())
    prev = previous.get(row.clip_id)
    if (prev is not None and previous_dir is not None and prev.extra.get("source_sha256") == source_hash
            and prev.extra.get("settings") == settings and _unchanged(previous_dir / prev.audio_path, prev.sha256)):
        _place(previous_dir / prev.audio_path, out_dir / prev.audio_path)
        clip = Clip(**{**prev.__dict__, "captions": captions, "split": split,
                       "source": row.source or prev.source, "license": row.license or prev.license})
        return clip, True
    # max_seconds: a header claiming hours, or a small file that decodes to far more samples than it
    # weighs, is refused from its header or after max_duration_s of audio, never decoded in full.
    decoded = audio.decode(raw, a.sample_rate, max_bytes=a.max_file_bytes, max_seconds=a.max_duration_s)
    if decoded.duration_s < a.min_duration_s:
        raise audio.AudioError("too_short", f"{decoded.duration_s:.2f} s < {a.min_duration_s} s")
    level = audio.rms_dbfs(decoded.samples)
    if level < a.silence_rms_dbfs:
        raise audio.AudioError("silent", f"RMS {level:.1f} dBFS < {a.silence_rms_dbfs} dBFS")
    audio.write(out_dir / rel, decoded.samples, decoded.sample_rate)
    sha = hashlib.sha256((out_dir / rel).read_bytes()).hexdigest()
    extra = dict(row.extra, source_sha256=source_hash, settings=settings)
    # A canonical source was already resampled once: keep what the original recording was.
    orig_sr = int(extra.pop("orig_sample_rate", decoded.orig_sample_rate))
    orig_ch = int(extra.pop("orig_channels", decoded.orig_channels))
    return Clip(row.clip_id, rel, captions, round(decoded.duration_s, 4), decoded.sample_rate,
                orig_sr, orig_ch, row.source or "unknown",
                row.license or "unknown", split, sha, extra), False


def shard_of(row: SourceRow | BadRow, num_shards: int) -> int:
    """Which shard handles a row: by a hash of its clip id (so a clip's duplicate rows meet in one shard),
    by row number for rows too broken to have an id."""
    if num_shards == 1:
        return 0
    key = row.clip_id or f"row:{row.row}"
    return int.from_bytes(hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()[:8], "big") % num_shards


def ingest(source: str | Path, out_dir: str | Path, config: IngestConfig, previous: str | Path | None = None,
           shard: int = 0, num_shards: int = 1) -> IngestResult:
    """Read ``source`` (folder, file or fsspec URL) and write the canonical dataset to ``out_dir``.

    ``previous`` is an earlier dataset whose unchanged clips are taken over instead of decoded again (it
    may be ``out_dir`` itself, as ``dvc repro`` passes it). ``out_dir`` ends up holding exactly the
    manifest's files. With ``num_shards`` > 1 only shard ``shard``'s rows are handled and the
    bad-fraction gate is left to :func:`merge_shards`, which sees every row.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in 0..{num_shards - 1}")
    with exclusive_output(out_dir, "ingest"):
        return _ingest(source, Path(out_dir), config, Path(previous) if previous is not None else None,
                       shard, num_shards)


def _ingest(source: str | Path, out: Path, config: IngestConfig, previous_dir: Path | None, shard: int,
            num_shards: int) -> IngestResult:
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    lang = config.ingest.training_language
    fmt_used, rows, root = read_source(str(source), config.format, lang)
    confinement = Confinement.of(root, config.ingest.allowed_roots)
    rows = [r for r in rows if shard_of(r, num_shards) == shard]
    earlier = _previous(previous_dir)
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
        refused = confinement.refusal(row.audio_url)
        if refused is not None:  # checked before the file is opened: nothing outside the roots is read
            quarantined.append(Quarantined(row.row, row.clip_id, *refused))
            continue
        captions = _clean_captions(row, dropped)
        if not captions.get(lang):
            quarantined.append(Quarantined(row.row, row.clip_id, "empty_caption",
                                           f"no non-empty caption in the training language {lang!r}"))
            continue
        try:
            clip, was_reused = _convert(row, captions, out, config, earlier, previous_dir, confinement)
        except audio.AudioError as exc:
            detail = exc.detail if row.audio_url in exc.detail else f"{row.audio_url}: {exc.detail}"
            quarantined.append(Quarantined(row.row, row.clip_id, exc.reason, detail))
            continue
        reused += was_reused
        clips.append(clip)
    result = IngestResult(fmt_used, out, clips, quarantined, dropped, reused)
    _write_dataset(result, str(source), config)
    log.info("%s", result.summary())
    if num_shards == 1:
        _gate(result, config)
    return result


def _write_dataset(result: IngestResult, source: str, config: IngestConfig) -> None:
    """Manifest and quarantine report; files no clip names are removed so the folder equals the manifest."""
    out = result.out_dir
    keep = {c.audio_path for c in result.clips}
    for stale in (out / AUDIO_DIR).iterdir():
        if f"{AUDIO_DIR}/{stale.name}" not in keep:
            stale.unlink()
    write_manifest(result.clips, out)
    report = {"source": source, "format": result.format, "total_rows": result.total_rows,
              "kept": len(result.clips), "bad_fraction": round(result.bad_fraction, 6),
              "max_bad_fraction": config.ingest.max_bad_fraction,
              "quarantined": [q.__dict__ for q in sorted(result.quarantined, key=lambda q: (q.row, q.clip_id))],
              "dropped_captions": sorted(result.dropped_captions, key=lambda d: (d["clip_id"], d["language"], d["index"]))}
    atomic_write_text(out / QUARANTINE_NAME, json.dumps(report, indent=2, ensure_ascii=False))


def _gate(result: IngestResult, config: IngestConfig) -> None:
    limit = config.ingest.max_bad_fraction
    if result.bad_fraction > limit:
        raise IngestFailed(f"{len(result.quarantined)} of {result.total_rows} rows quarantined "
                           f"({result.bad_fraction:.1%} > ingest.max_bad_fraction {limit:.1%}); "
                           f"see {result.out_dir / QUARANTINE_NAME}")


def merge_shards(parts: list[str | Path], out_dir: str | Path, config: IngestConfig) -> IngestResult:
    """One dataset from the shards :func:`ingest` wrote: their clips, files and quarantine entries.

    The result equals what a single-shard ingest of the same source writes; the bad-fraction gate runs
    here, over every row.
    """
    with exclusive_output(out_dir, "merge-shards"):
        return _merge_shards(parts, Path(out_dir), config)


def _merge_shards(parts: list[str | Path], out: Path, config: IngestConfig) -> IngestResult:
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    clips: list[Clip] = []
    quarantined: list[Quarantined] = []
    dropped: list[dict[str, Any]] = []
    formats, sources = set(), set()
    for part in map(Path, parts):
        report = json.loads((part / QUARANTINE_NAME).read_text(encoding="utf-8"))
        formats.add(report["format"])
        sources.add(report["source"])
        quarantined += [Quarantined(**q) for q in report["quarantined"]]
        dropped += report["dropped_captions"]
        for clip in read_manifest(part):
            _place(part / clip.audio_path, out / clip.audio_path)
            clips.append(clip)
    ids = [c.clip_id for c in clips]
    if len(ids) != len(set(ids)):
        raise ValueError("shards hold the same clip twice: they were not cut from one source with one shard count")
    if len(formats) > 1 or len(sources) > 1:
        raise ValueError(f"shards come from different sources or formats: {sorted(sources)} {sorted(formats)}")
    result = IngestResult(formats.pop() if formats else "unknown", out, clips, quarantined, dropped)
    _write_dataset(result, sources.pop() if sources else "", config)
    log.info("merged %d shards: %s", len(parts), result.summary())
    _gate(result, config)
    return result
