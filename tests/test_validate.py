"""The validate step on real generated datasets: each defect is caught by its named check and names its clip.

Every dataset is written to disk as real audio plus ``manifest.jsonl`` and validated through Great
Expectations and lingua for real. Each dataset is validated once per module (the lingua models take
about 10 s to load once; a GX run takes about a second) and several tests read the same result.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import soundfile as sf

from cacara.manifest import MANIFEST_NAME, Clip
from cacara.config import ValidateConfig
from cacara.params import load_params
from components.validate import (CHECKS, ValidationFailed, ValidationResult, judge_caption_languages,
                                 validate)
from tests.conftest import write_tone

SR = 16000
CAPTIONS = [  # each checked to be detected as English by lingua
    "A dog barks loudly while cars pass on the street.",
    "Heavy rain falls on a metal roof during a storm.",
    "A man speaks quietly as birds chirp in the background.",
    "Water flows steadily from a kitchen tap into a sink.",
    "Footsteps echo in a long empty hallway.",
    "A train horn sounds as the train approaches the station.",
    "Children laugh and shout on a busy playground.",
    "Wind blows through the trees and leaves rustle.",
    "A door creaks open and then slams shut.",
    "An engine idles and then revs up several times.",
    "People are talking in a crowded restaurant.",
    "A bell rings several times in the distance.",
]
# 7/2/3 of 12 matches split.train/val/test = 0.6/0.15/0.25 within the tolerance.
BALANCED = ["train"] * 7 + ["val"] * 2 + ["test"] * 3
GERMAN_LONG = "Der Hund bellt sehr laut im Garten hinter dem Haus."

Edit = Callable[[list[dict[str, Any]], Path], None]


def make_dataset(root: Path, splits: list[str] = BALANCED, edit: Edit | None = None) -> Path:
    """Write a canonical dataset: one 1-2 s 16 kHz file per clip, rows in manifest order.

    ``edit(rows, root)`` may change rows and files before the manifest is written; rows are written
    verbatim (not through write_manifest) so a test can plant duplicates or broken fields.
    """
    rows = []
    for i, split in enumerate(splits):
        clip_id = f"clip{i:02d}"
        rel = f"audio/{clip_id}.{'flac' if i % 2 else 'wav'}"
        seconds = 1.0 + (i % 3) * 0.5
        write_tone(root / rel, seconds=seconds, sr=SR, freq=220.0 + 40 * i, seed=i)
        captions = {"en": [CAPTIONS[i % len(CAPTIONS)]], "de": ["Ein Geräusch im Hintergrund."]}
        rows.append(Clip(clip_id=clip_id, audio_path=rel, captions=captions, duration_s=seconds, sample_rate=SR,
                         orig_sample_rate=SR, orig_channels=1, source="synthetic", license="CC0-1.0",
                         split=split, sha256="0" * 64).to_json())
    if edit:
        edit(rows, root)
    with (root / MANIFEST_NAME).open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return root


def run(tmp_path_factory: pytest.TempPathFactory, name: str, splits: list[str] = BALANCED,
        edit: Edit | None = None) -> tuple[ValidationResult, ValidationFailed | None, Path]:
    """Validate a fresh dataset; a ValidationFailed is returned, not raised, so several tests can read it."""
    root = tmp_path_factory.mktemp(name)
    dataset = make_dataset(root / "dataset", splits, edit)
    reports = root / "reports"
    try:
        return validate(dataset, reports, ValidateConfig.from_params(load_params())), None, reports
    except ValidationFailed as exc:
        assert exc.result is not None
        return exc.result, exc, reports


def _broken(rows: list[dict[str, Any]], root: Path) -> None:
    """One defect per clip, so each check must name exactly its own clip."""
    rows.append(dict(rows[0]))                                   # clip00 twice: unique_ids
    rows[1]["captions"] = {"en": [""]}                           # captions_present (and caption_length)
    rows[2]["captions"] = {"en": [GERMAN_LONG]}                  # training_language (clip02 is train)
    rows[3]["captions"] = {"en": ["A cow."]}                     # short: must NOT fail training_language
    write_tone(root / "audio/clip04_8k.wav", seconds=1.0, sr=8000)
    rows[4]["audio_path"] = "audio/clip04_8k.wav"                # sample_rate
    rows[5]["audio_path"] = "audio/gone.flac"                    # audio_decodable: missing
    (root / "audio/corrupt.flac").write_bytes(b"fLaC but not really" * 64)
    rows[6]["audio_path"] = "audio/corrupt.flac"                 # audio_decodable: undecodable


def _quiet(rows: list[dict[str, Any]], root: Path) -> None:
    t = np.arange(SR) / SR
    sf.write(str(root / "audio/quiet.wav"), (2e-4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), SR)
    rows[8]["audio_path"] = "audio/quiet.wav"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return run(tmp_path_factory, "clean")


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return run(tmp_path_factory, "broken", edit=_broken)


def test_clean_dataset_passes_and_writes_reports(clean):
    result, exc, reports = clean
    assert exc is None and result.success
    assert {e.name for e in result.expectations} == set(CHECKS)
    assert all(e.success for e in result.expectations), [e.name for e in result.failed()]
    report = json.loads((reports / "validation.json").read_text())
    assert report["success"] is True and report["n_clips"] == len(BALANCED)
    assert {e["name"]: e["severity"] for e in report["expectations"]}["rms_level"] == "warning"
    # Real GX Data Docs: the index plus one rendered validation page per table.
    assert result.data_docs_index == reports / "data_docs" / "index.html"
    index = result.data_docs_index.read_text()
    assert "Great Expectations" in index
    pages = list((reports / "data_docs" / "validations").rglob("*.html"))
    assert {p.relative_to(reports / "data_docs" / "validations").parts[0] for p in pages} == {
        "cacara_manifest", "cacara_audio", "cacara_captions", "cacara_splits"}
    summary = (reports / "validation.html").read_text()
    assert 'href="data_docs/index.html"' in summary and "passed" in summary


def test_broken_dataset_raises_after_writing_reports(broken):
    result, exc, reports = broken
    assert exc is not None and not result.success
    assert (reports / "validation.json").is_file() and result.data_docs_index.is_file()
    message = str(exc)
    for name, clip in [("unique_ids", "clip00"), ("captions_present", "clip01"), ("training_language", "clip02"),
                       ("sample_rate", "clip04"), ("audio_decodable", "clip05")]:
        assert name in message and clip in message
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize("check, offending", [
    ("unique_ids", ["clip00"]),
    ("captions_present", ["clip01"]),
    ("training_language", ["clip02"]),
    ("sample_rate", ["clip04"]),
    ("audio_decodable", ["clip05", "clip06"]),
])
def test_each_defect_is_named_by_its_check(broken, check, offending):
    result, _, _ = broken
    outcome = result.get(check)
    assert outcome.severity == "critical" and not outcome.success
    assert outcome.offending_ids == offending


def test_language_rule_short_caption_passes_long_german_fails(broken):
    result, _, reports = broken
    lang = result.get("training_language")
    assert "clip03" not in lang.offending_ids  # "A cow." (lingua: Polish 0.22) is too short to judge
    row = next(r for r in lang.offending_rows if r["clip_id"] == "clip02")
    assert row["caption"] == GERMAN_LONG and row["detected_language"] == "de"
    # German evaluation captions ("de") of training clips are not the training language's business.
    report = json.loads((reports / "validation.json").read_text())
    entry = next(e for e in report["expectations"] if e["name"] == "training_language")
    assert entry["n_offending"] == 1 and entry["offending_ids"] == ["clip02"]


def test_audio_failures_say_why(broken):
    result, _, _ = broken
    statuses = {r["clip_id"]: r["audio_status"] for r in result.get("audio_decodable").offending_rows}
    assert statuses == {"clip05": "missing", "clip06": "undecodable"}
    rates = [r["file_sample_rate"] for r in result.get("sample_rate").offending_rows]
    assert rates == [8000]
    assert result.get("duration").success and result.get("split_fractions").success


def test_quiet_clip_only_warns(tmp_path_factory, caplog):
    with caplog.at_level(logging.WARNING, logger="components.validate"):
        result, exc, reports = run(tmp_path_factory, "quiet", edit=_quiet)
    assert exc is None and result.success
    rms = result.get("rms_level")
    assert rms.severity == "warning" and not rms.success and rms.offending_ids == ["clip08"]
    assert any("rms_level" in r.getMessage() for r in caplog.records)
    report = json.loads((reports / "validation.json").read_text())
    assert report["success"] is True and report["failed_warning"] == ["rms_level"]


def test_skewed_split_fails(tmp_path_factory):
    result, exc, _ = run(tmp_path_factory, "skewed", splits=["train"] * 11 + ["test"])
    assert exc is not None and "split_fractions" in str(exc)
    outcome = result.get("split_fractions")
    assert not outcome.success and set(outcome.offending_ids) == {"train", "test"}  # val: 0 vs 0.15, at the tolerance
    assert [c.name for c in result.failed("critical")] == ["split_fractions"]


def test_language_rule_directly():
    params = load_params()
    verdicts = judge_caption_languages(["A cow.", GERMAN_LONG, "Birds chirping.", CAPTIONS[0]], "en",
                                       ValidateConfig.from_params(params))
    assert [ok for ok, _ in verdicts] == [True, False, True, True]
    assert verdicts[1][1] == "de"


def test_unknown_check_name_in_params_is_an_error(tmp_path):
    params = load_params(overrides={"validate.warning": ["rms_level", "clipping", "loudness"]})
    with pytest.raises(ValueError, match="validate.warning.2: Input should be 'schema'.*got 'loudness'"):
        validate(make_dataset(tmp_path / "d", BALANCED[:3]), tmp_path / "r", ValidateConfig.from_params(params))


def test_schema_names_every_bad_row(tmp_path):
    """Rows are judged one by one (read leniently), so one bad row does not hide the next."""
    def edit(rows: list[dict[str, Any]], root: Path) -> None:
        rows[0]["clip_id"] = 17                 # wrong type
        rows[1].pop("sha256")                   # missing field
        rows[2]["colour"] = "blue"              # field outside the contract
        rows[3]["captions"] = {}                # no caption at all
        rows[4]["audio_path"] = "../outside.wav"  # escapes the dataset folder

    dataset = make_dataset(tmp_path / "d", edit=edit)
    with (dataset / MANIFEST_NAME).open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(ValidationFailed) as info:
        validate(dataset, tmp_path / "r", ValidateConfig.from_params(load_params()))
    result = info.value.result
    assert set(result.get("schema").offending_ids) == {"17", "clip01", f"line {len(BALANCED) + 1}"}
    assert "colour" in str(info.value)
    assert result.get("captions_present").offending_ids == ["clip03"]
    assert result.get("audio_decodable").offending_rows[0]["audio_status"] == "bad_path"
