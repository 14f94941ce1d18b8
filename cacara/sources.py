"""Readers for the dataset formats ingest accepts, from a local path or any fsspec URL.

Every reader yields ``SourceRow``s (or ``BadRow``s for rows that cannot even be parsed) so ingest has
one code path for quarantine, decoding and writing whatever the input format was.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import fsspec

from cacara.manifest import MANIFEST_NAME

log = logging.getLogger(__name__)

FORMATS = ("canonical", "manifest", "clotho", "audiocaps")
MANIFEST_CANDIDATES = (MANIFEST_NAME, "manifest.csv")
AUDIO_SUBDIRS = ("", "audio")
CLOTHO_CAPTION = re.compile(r"^caption_(\d+)$")
# Canonical fields that ingest recomputes from the audio instead of trusting the input.
DERIVED = {"duration_s", "sample_rate", "sha256"}
LANG_CAPTION = re.compile(r"^caption_([A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})?)$")


@dataclass
class SourceRow:
    """A clip as the source describes it, before decoding."""

    row: int
    clip_id: str
    audio_url: str
    captions: dict[str, list[str]]
    source: str = ""
    license: str = ""
    split: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BadRow:
    """A row that could not be parsed at all; it goes to quarantine with its reason."""

    row: int
    clip_id: str
    reason: str
    detail: str


def _join(base: str, rel: str) -> str:
    if "://" in rel or rel.startswith("/"):
        return rel
    return f"{base.rstrip('/')}/{rel}" if base else rel


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _decode_text(raw: bytes) -> str:
    """Decode keeping undecodable bytes as surrogates, so one bad row does not sink the whole file."""
    text = raw.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text


def _as_caption_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"captions must be a string or a list of strings, got {type(value).__name__}")


def locate(source: str, fmt: str) -> tuple[fsspec.AbstractFileSystem, str, str]:
    """Find the manifest/CSV inside ``source`` (a folder or a file) and decide the format.

    Returns (filesystem, path of the table, format). ``auto`` sniffs the header because users point
    us at Clotho and AudioCaps CSVs by folder as often as by file.
    """
    fs, path = fsspec.core.url_to_fs(source)
    if fs.isdir(path):
        candidates = [f"{path.rstrip('/')}/{name}" for name in MANIFEST_CANDIDATES]
        candidates += sorted(p for p in fs.ls(path, detail=False) if str(p).endswith(".csv"))
        found = [c for c in candidates if fs.isfile(c)]
        if not found:
            raise FileNotFoundError(f"no {MANIFEST_NAME} or CSV found in {source}")
        table = found[0]
    elif fs.isfile(path):
        table = path
    else:
        raise FileNotFoundError(f"dataset source not found: {source}")
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS} or auto")
        return fs, table, fmt
    with fs.open(table, "rb") as fh:
        head = _decode_text(fh.read(65536))
    if table.endswith(".jsonl") or table.endswith(".json"):
        first = next((ln for ln in head.split("\n") if ln.strip()), "{}")
        try:
            row = json.loads(first)
        except json.JSONDecodeError:
            return fs, table, "manifest"
        canonical = isinstance(row, dict) and {"audio_path", "sample_rate", "sha256"} <= set(row)
        return fs, table, "canonical" if canonical else "manifest"
    header = {h.strip() for h in next(csv.reader(io.StringIO(head)), [])}
    if {"audiocap_id", "youtube_id", "caption"} <= header:
        return fs, table, "audiocaps"
    if "file_name" in header and any(CLOTHO_CAPTION.match(h) for h in header):
        return fs, table, "clotho"
    return fs, table, "manifest"


LOCAL_PROTOCOLS = ("file", "local")
#: Path segments a remote store may resolve differently from us (HTTP clients undo ``%2e%2e``; S3 keys
#: may literally contain ``..``): refused rather than normalised.
DOT_SEGMENT = re.compile(r"^(\.|%2e){1,2}$", re.IGNORECASE)


def _split_url(url: str) -> tuple[str, str]:
    """(protocol, path): "" and an absolute path for local files (``file://`` and ``local://`` included),
    else the protocol and the path as written."""
    if "://" in url:
        protocol, path = url.split("://", 1)
        if protocol.lower() in LOCAL_PROTOCOLS:
            return "", "/" + path.lstrip("/")
        return protocol, "/" + path.lstrip("/")
    # Not normalised: "link/../x" means what the kernel makes of it (link followed first), which only
    # realpath of the path as written tells.
    return "", url if os.path.isabs(url) else os.path.join(os.getcwd(), url)


def _within(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root.endswith("/") else root + "/")


def _root(root: str) -> tuple[str, str]:
    """A root as (protocol, canonical path): symlinks resolved for local folders."""
    protocol, path = _split_url(root)
    return protocol, (os.path.realpath(path) if not protocol else posixpath.normpath(path))


class Escaped(PermissionError):
    """The file opened lies outside the roots, although its name did not when it was checked."""


@dataclass(frozen=True)
class Confinement:
    """Where a source's audio may be read from: the folder of its manifest or CSV, and the roots that
    ``ingest.allowed_roots`` lists.

    Why: manifests come from buckets other teams fill. Without this, a row naming ``/etc/passwd``,
    ``../../secrets.flac`` or a symlink out of the folder would be opened and read by the pipeline (with
    the credentials of the pipeline), and a remote manifest could make it read local files. A local file
    is checked twice: by name before it is opened (the quarantine reason), and by what was opened
    (:meth:`open`), so swapping a symlink in between gains nothing.
    """

    roots: tuple[str, ...]

    @classmethod
    def of(cls, source_root: str, allowed: Iterable[str] = ()) -> "Confinement":
        return cls(tuple([source_root, *allowed]))

    @functools.cached_property
    def _canonical(self) -> list[tuple[str, str]]:
        """(protocol, path) of each root, symlinks resolved: once, not for every row."""
        return [_root(r) for r in self.roots]

    @functools.cached_property
    def _lexical_local(self) -> list[str]:
        """The local roots as written (normalised, links not followed)."""
        return [os.path.normpath(path) for protocol, path in map(_split_url, self.roots) if not protocol]

    def refusal(self, url: str) -> tuple[str, str] | None:
        """None when ``url`` lies inside a root, else (quarantine reason, detail naming the file)."""
        hint = f"outside {self._roots_text()} (list its folder under ingest.allowed_roots to allow it)"
        if url.startswith("://") or "::" in url.split("://", 1)[0]:
            return "outside_root", f"{url}: not a plain path or URL, {hint}"
        protocol, path = _split_url(url)
        roots = [r for r in self._canonical if r[0] == protocol]
        if protocol:
            segments = path.split("/")
            if any(DOT_SEGMENT.match(seg) for seg in segments) or not any(_within(path, r) for _, r in roots):
                return "outside_root", f"{url} is {hint}"
            return None
        if not roots:
            return "outside_root", f"{url} is a local file, {hint}"
        lexical = os.path.normpath(path)
        # realpath of the path as written: the kernel follows a symlink before it applies a later "..".
        real = os.path.realpath(path)
        if not any(_within(lexical, r) for r in self._lexical_local + [r for _, r in roots]):
            reason = "path_escape" if ".." in url.replace("\\", "/").split("/") else "absolute_path"
            return reason, f"{url} is {hint}"
        if not any(_within(real, r) for _, r in roots):
            return "symlink_escape", f"{url} resolves to {real}, {hint}"
        return None

    def open(self, url: str):
        """The file, opened for reading, after checking what was opened (local files) lies in a root.

        Raises FileNotFoundError / OSError as ``open`` does, and Escaped when the opened file is outside the
        roots (a symlink swapped after :meth:`refusal` looked).
        """
        protocol, path = _split_url(url)
        if protocol:
            return fsspec.open(url, "rb").open()
        fh = open(path, "rb")  # noqa: SIM115 - handed to the caller
        try:
            opened = os.readlink(f"/proc/self/fd/{fh.fileno()}")
        except OSError:
            opened = os.path.realpath(path)
        if not any(_within(opened, r) for p, r in self._canonical if not p):
            fh.close()
            raise Escaped(f"{url} opened as {opened}, outside {self._roots_text()}")
        return fh

    def _roots_text(self) -> str:
        return "the source root " + self.roots[0] + (f" and the allowed roots {list(self.roots[1:])}"
                                                     if len(self.roots) > 1 else "")


def read_source(source: str, fmt: str, training_language: str) -> tuple[str, list[SourceRow | BadRow], str]:
    """Parse every row of the source; returns (format, rows, root). Unparseable rows come back as BadRow.

    ``root`` is the folder holding the manifest or CSV, as a URL for remote sources: the audio a row
    names must lie inside it (:class:`Confinement`).
    """
    fs, table, fmt = locate(source, fmt)
    base = table.rsplit("/", 1)[0] if "/" in table else ""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    with fs.open(table, "rb") as fh:
        text = _decode_text(fh.read())
    base_url = prefix + base
    if table.endswith((".jsonl", ".json")):
        rows = list(_jsonl_rows(text, base_url, training_language))
    else:
        reader = {"clotho": _clotho_rows, "audiocaps": _audiocaps_rows, "manifest": _csv_manifest_rows}[fmt]
        rows = list(reader(text, base_url, training_language, fs, prefix, table))
    name = table.rsplit("/", 1)[-1]
    for r in rows:
        if isinstance(r, BadRow):  # the detail names the file and line, as the audio errors name the file
            r.detail = f"{name} line {r.row}: {r.detail}"
    log.info("read %d rows from %s (%s format)", len(rows), table, fmt)
    return fmt, rows, base_url or ("/" if table.startswith("/") else ".")


def _check_text(row: SourceRow | BadRow) -> SourceRow | BadRow:
    if isinstance(row, BadRow):
        return row
    fields = [row.clip_id, row.audio_url] + [c for caps in row.captions.values() for c in caps]
    if any(_has_surrogates(f) for f in fields):
        return BadRow(row.row, row.clip_id.encode("utf-8", "replace").decode(), "invalid_utf8",
                      "row contains bytes that are not valid UTF-8")
    return row


def _jsonl_rows(text: str, base: str, training_language: str) -> Iterator[SourceRow | BadRow]:
    # Split on newlines only: str.splitlines() also splits on U+2028, U+0085 and other characters that
    # JSON allows unescaped inside a caption, which would cut a valid row in two.
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        if _has_surrogates(line):
            yield BadRow(lineno, "", "invalid_utf8", "line contains bytes that are not valid UTF-8")
            continue
        try:
            d = json.loads(line)
            if not isinstance(d, dict):
                raise ValueError("row is not a JSON object")
            clip_id = str(d.get("clip_id") or d.get("id") or "").strip()
            audio = d.get("audio_path") or d.get("audio") or d.get("file_name")
            if not clip_id or not audio:
                raise ValueError("row needs clip_id and audio (or audio_path)")
            raw_caps = d.get("captions")
            if raw_caps is None and "caption" in d:
                raw_caps = {training_language: d["caption"]}
            if not isinstance(raw_caps, dict):
                raise ValueError("captions must be an object {language: [caption, ...]}")
            captions = {str(lang): _as_caption_list(v) for lang, v in raw_caps.items()}
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            yield BadRow(lineno, "", "malformed_row", str(exc))
            continue
        known = {"clip_id", "id", "audio_path", "audio", "file_name", "captions", "caption", "source",
                 "license", "split", "extra"}
        extra = {k: v for k, v in d.items() if k not in known and k not in DERIVED}
        extra.update(d.get("extra") or {})
        yield _check_text(SourceRow(lineno, clip_id, _join(base, str(audio)), captions,
                                    str(d.get("source") or ""), str(d.get("license") or ""),
                                    d.get("split"), extra))


def _csv_dicts(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    reader = csv.DictReader(io.StringIO(text))
    for i, row in enumerate(reader, 2):
        yield i, {(k or "").strip(): (v or "") for k, v in row.items()}


def _find_audio(fs: fsspec.AbstractFileSystem, prefix: str, base: str, names: list[str],
                subdirs: tuple[str, ...] = AUDIO_SUBDIRS) -> str:
    """Audio next to the CSV or under audio/; the first existing candidate, else the first one."""
    plain = base[len(prefix):] if prefix and base.startswith(prefix) else base
    for name in names:
        for sub in subdirs:
            cand = _join(_join(plain, sub) if sub else plain, name)
            if fs.exists(cand):
                return prefix + cand
    return prefix + _join(plain, names[0])


def _clotho_rows(text, base, training_language, fs, prefix, table="") -> Iterator[SourceRow | BadRow]:
    """Clotho ships ``clotho_captions_<split>.csv`` beside a ``<split>/`` folder of wavs: look there too."""
    split_dir = table.rsplit("/", 1)[-1].removesuffix(".csv").rsplit("_", 1)[-1]
    subdirs = AUDIO_SUBDIRS + ((split_dir,) if split_dir else ())
    for lineno, d in _csv_dicts(text):
        name = d.get("file_name", "").strip()
        if not name:
            yield BadRow(lineno, "", "malformed_row", "empty file_name")
            continue
        caps = [v for k, v in sorted(d.items()) if CLOTHO_CAPTION.match(k)]
        yield _check_text(SourceRow(lineno, name, _find_audio(fs, prefix, base, [name], subdirs),
                                    {training_language: caps}, source="clotho"))


def _audiocaps_rows(text, base, training_language, fs, prefix, table="") -> Iterator[SourceRow | BadRow]:
    """AudioCaps has one caption per row; rows of the same (youtube_id, start_time) are one clip."""
    grouped: dict[str, SourceRow] = {}
    bad: list[BadRow] = []
    for lineno, d in _csv_dicts(text):
        yt, start = d.get("youtube_id", "").strip(), d.get("start_time", "").strip()
        if not yt:
            bad.append(BadRow(lineno, d.get("audiocap_id", ""), "malformed_row", "empty youtube_id"))
            continue
        try:
            start_s = int(float(start or 0))
        except ValueError:
            bad.append(BadRow(lineno, yt, "malformed_row", f"start_time {start!r} is not a number"))
            continue
        clip_id = f"{yt}_{start_s}"
        if clip_id not in grouped:
            names = [f"{clip_id}.wav", f"{clip_id}.flac", f"{yt}.wav", f"{yt}.flac",
                     f"{d.get('audiocap_id', '').strip()}.wav"]
            grouped[clip_id] = SourceRow(lineno, clip_id, _find_audio(fs, prefix, base, names),
                                         {training_language: []}, source="audiocaps",
                                         extra={"audiocap_ids": []})
        grouped[clip_id].captions[training_language].append(d.get("caption", ""))
        grouped[clip_id].extra["audiocap_ids"].append(d.get("audiocap_id", "").strip())
    yield from bad
    for row in grouped.values():
        yield _check_text(row)


def _csv_manifest_rows(text, base, training_language, fs, prefix, table="") -> Iterator[SourceRow | BadRow]:
    for lineno, d in _csv_dicts(text):
        clip_id = (d.get("clip_id") or d.get("id") or "").strip()
        audio = (d.get("audio_path") or d.get("audio") or d.get("file_name") or "").strip()
        if not clip_id or not audio:
            yield BadRow(lineno, clip_id, "malformed_row", "row needs clip_id and audio (or audio_path)")
            continue
        captions: dict[str, list[str]] = {}
        for key, value in d.items():
            if key == "caption" or CLOTHO_CAPTION.match(key):
                captions.setdefault(training_language, []).append(value)
            elif (m := LANG_CAPTION.match(key)):
                captions.setdefault(m.group(1).replace("_", "-"), []).append(value)
        yield _check_text(SourceRow(lineno, clip_id, _join(base, audio), captions,
                                    d.get("source", ""), d.get("license", ""), d.get("split") or None))
