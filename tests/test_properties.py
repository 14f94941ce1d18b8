"""Property-based tests (hypothesis): any bytes and any rows end as a kept clip or a quarantine entry, never
an uncaught exception, and a valid row is never lost because a neighbour is bad.

The sizes are set for ``make test`` on 2 cores (about a minute in all); ``HYPOTHESIS_PROFILE=long`` runs
ten times as many examples.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cacara import audio
from cacara.config import IngestConfig
from cacara.params import load_params
from cacara.sources import SourceRow
from components.ingest import _clean_captions, ingest
from tests.conftest import write_tone

settings.register_profile("default", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=250, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

N_VALID = 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, IngestConfig]:
    """Three real clips (one of them 44.1 kHz stereo) that every generated source can name."""
    root = tmp_path_factory.mktemp("prop")
    write_tone(root / "audio" / "v0.wav", 1.0, 16000)
    write_tone(root / "audio" / "v1.flac", 1.2, 44100, channels=2, freq=300)
    write_tone(root / "audio" / "v2.ogg", 0.8, 22050, freq=700)
    params = load_params(overrides={"ingest.max_bad_fraction": 1.0})
    return root, IngestConfig.from_params(params)


VALID_AUDIO = ["audio/v0.wav", "audio/v1.flac", "audio/v2.ogg"]


def _valid(i: int) -> dict:
    return {"clip_id": f"valid-{i}", "audio": VALID_AUDIO[i], "captions": {"en": [f"Valid clip number {i}."]}}


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=10)
row_keys = st.sampled_from(["clip_id", "id", "audio", "audio_path", "file_name", "captions", "caption", "source",
                            "license", "split", "extra", "duration_s", "sha256"])
junk_rows = st.dictionaries(row_keys | st.text(max_size=6), json_values | st.sampled_from(VALID_AUDIO + ["../x.wav"]),
                            max_size=6).map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass"))
junk_lines = st.one_of(
    junk_rows,
    json_values.map(lambda v: json.dumps(v).encode()),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.binary(max_size=40),
).map(lambda b: b.replace(b"\n", b" ")).filter(lambda b: b"valid-" not in b)


def _run(root: Path, config: IngestConfig, table: str, body: bytes):
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        src = Path(tmp) / "src"
        (src / "audio").mkdir(parents=True)
        for name in VALID_AUDIO:
            os.link(root / name, src / name)
        (src / table).write_bytes(body)
        return ingest(src, Path(tmp) / "out", config)


def _check(result, expected_rows: int) -> None:
    kept = {c.clip_id: c for c in result.clips}
    for i in range(N_VALID):
        assert f"valid-{i}" in kept, [(q.clip_id, q.reason, q.detail) for q in result.quarantined]
        assert kept[f"valid-{i}"].captions["en"] == [f"Valid clip number {i}."]
    assert len(result.clips) + len(result.quarantined) == expected_rows
    assert all(q.reason and q.detail for q in result.quarantined)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(junk=st.lists(junk_lines, max_size=8), positions=st.lists(st.integers(0, 8), min_size=N_VALID, max_size=N_VALID),
       crlf=st.booleans())
def test_any_jsonl_lines_end_kept_or_quarantined_and_valid_rows_survive(corpus, junk, positions, crlf):
    root, config = corpus
    lines = list(junk)
    for i, pos in enumerate(positions):
        lines.insert(min(pos, len(lines)), json.dumps(_valid(i)).encode())
    body = (b"\r\n" if crlf else b"\n").join(lines) + b"\n"
    expected = sum(1 for ln in body.split(b"\n") if ln.removesuffix(b"\r").decode("utf-8", "surrogateescape").strip())
    _check(_run(root, config, "manifest.jsonl", body), expected)


csv_cells = st.text(max_size=15) | st.sampled_from(VALID_AUDIO + ["", "../../etc/passwd", "valid"])
CSV_HEADER = ["clip_id", "audio", "caption", "caption_fr", "license"]


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(junk=st.lists(st.lists(csv_cells, max_size=7), max_size=8),
       positions=st.lists(st.integers(0, 8), min_size=N_VALID, max_size=N_VALID))
def test_any_csv_rows_end_kept_or_quarantined_and_valid_rows_survive(corpus, junk, positions):
    root, config = corpus
    rows = [[c.replace("valid-", "v-") for c in r] for r in junk]
    for i, pos in enumerate(positions):
        v = _valid(i)
        rows.insert(min(pos, len(rows)), [v["clip_id"], v["audio"], v["captions"]["en"][0], "Un clip.", "CC0"])
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(CSV_HEADER)
    writer.writerows(rows)
    body = buf.getvalue().encode("utf-8", "surrogatepass")
    expected = sum(1 for r in csv.reader(io.StringIO(body.decode("utf-8", "surrogateescape"))) if r) - 1
    _check(_run(root, config, "manifest.csv", body), expected)


@given(captions=st.dictionaries(st.sampled_from(["en", "fr", "ja", "zz"]), st.lists(st.text(max_size=30), max_size=5)))
def test_caption_cleaning_keeps_or_records_every_caption(captions):
    dropped: list[dict] = []
    kept = _clean_captions(SourceRow(1, "clip", "a.wav", captions), dropped)
    assert sum(map(len, kept.values())) + len(dropped) == sum(map(len, captions.values()))
    for lang, texts in kept.items():
        assert texts == [" ".join(t.split()) for t in captions[lang] if t.split()]
    assert all(not " ".join(captions[d["language"]][d["index"]].split()) for d in dropped)


def _decoded_or_refused(raw: bytes) -> None:
    try:
        out = audio.decode(raw, 16000, max_bytes=1 << 20, max_seconds=5.0)
    except audio.AudioError as exc:
        assert exc.reason in {"too_large", "undecodable", "empty", "too_long", "too_many_samples"}
        assert "0x" not in exc.detail
        return
    assert out.samples.dtype == np.float32 and out.samples.ndim == 1 and out.sample_rate == 16000
    assert np.isfinite(out.samples).all() and 0 < out.duration_s <= 5.0 + 1e-3


@given(raw=st.binary(max_size=2048))
def test_any_bytes_decode_or_are_refused(raw):
    _decoded_or_refused(raw)


def _real_file(fmt: str) -> bytes:
    buf = io.BytesIO()
    t = np.arange(4000) / 8000
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000, format=fmt)
    return buf.getvalue()


REAL = {fmt: _real_file(fmt) for fmt in ("WAV", "FLAC", "OGG")}


@given(fmt=st.sampled_from(sorted(REAL)), edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                         min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 10**6), extra=st.binary(max_size=64))
def test_damaged_real_files_decode_or_are_refused(fmt, edits, cut, extra):
    """Bytes flipped in the header or the body, a file cut short or with junk appended."""
    raw = bytearray(REAL[fmt])
    for pos, value in edits:
        raw[pos % len(raw)] = value
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    _decoded_or_refused(bytes(raw) + extra)
