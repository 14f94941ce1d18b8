"""The drift step on real audio: the demo corpus's held-out clips pass against its training clips, and
batches shifted the ways audio really shifts fail on the columns that shift, through the same ingest a
new dataset goes through; the serving log the service writes is read back and checked the same way.
Bad batches (empty, tiny, malformed, a truncated log line) get a clear error, never a crash.
"""

from __future__ import annotations

import json
import os
import re
import zlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPO

SR = 16000


@pytest.fixture(scope="module")
def drift(packaged, tmp_path_factory):
    from cacara.config import DriftConfig, IngestConfig

    params = packaged.params
    held_out = [c for c in packaged.clips if c.split in ("val", "test")]
    return SimpleNamespace(params=params, config=DriftConfig.from_params(params), ingest=IngestConfig.from_params(params),
                           reference=packaged.drift_reference, held_out=held_out, dataset=packaged.dataset,
                           model_dir=packaged.model_dir, root=tmp_path_factory.mktemp("drift"))


def _config(drift, **changes):
    """The drift settings with some values changed (validated as params.yaml's are)."""
    from cacara.config import DriftConfig

    return DriftConfig.from_values({**drift.config.model_dump(), "drift": {**drift.config.drift.model_dump(), **changes}})


def _source(drift, name: str, transform, clips=None) -> Path:
    """A new source folder (JSONL manifest + files) whose audio is ``transform(samples, clip)`` (16 kHz),
    written at the rate each clip's source had (so only the transform differs from the reference), and
    ingested into a canonical dataset as any new data would be."""
    from cacara import audio
    from components.ingest import ingest

    src = drift.root / f"src_{name}"
    (src / "audio").mkdir(parents=True)
    rows = []
    for clip in clips if clips is not None else drift.held_out:
        wave = audio.decode(drift.dataset / clip.audio_path, SR).samples
        rate = clip.orig_sample_rate
        out = audio.resample(transform(wave, clip), SR, rate)
        rel = f"audio/{clip.clip_id}.wav"
        sf.write(str(src / rel), np.clip(out, -1, 1), rate, subtype="PCM_16")
        rows.append({"clip_id": clip.clip_id, "audio": rel, "captions": clip.captions})
    (src / "manifest.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    dataset = drift.root / f"dataset_{name}"
    ingest(str(src / "manifest.jsonl"), dataset, drift.ingest.model_copy(update={"format": "manifest"}))
    return dataset


def _check(drift, current, config=None, name="check", model_dir=None):
    from components.drift import check_drift

    return check_drift(drift.reference, current, drift.root / f"out_{name}", config or _config(drift, current_splits=[]),
                       model_dir=model_dir)


def _fails(drift, current, name, config=None, model_dir=None) -> dict:
    from components.drift import DriftGateFailed

    with pytest.raises(DriftGateFailed) as caught:
        _check(drift, current, config, name, model_dir)
    summary = caught.value.summary
    assert summary["drifted"] and not summary["passed"]
    assert all(c in str(caught.value) for c in summary["drifted"]), "the error names every drifted column"
    return summary


# --------------------------------------------------------------------------------------------- passes


def test_held_out_clips_pass_against_the_training_reference(drift):
    """What `make run` checks: the demo's val and test clips against the profile of its train clips."""
    summary = _check(drift, drift.dataset, drift.config, "held_out")
    assert summary["passed"], summary["drifted"]
    assert summary["current"]["clips"] == len(drift.held_out)
    assert set(summary["columns"]) >= {"duration_s", "rms_dbfs", "silence_ratio", "caption_language", "emb_pc1"}
    assert summary["per_column_threshold"] == pytest.approx(drift.config.drift.alpha / len(summary["columns"]))


def test_two_disjoint_halves_pass_with_a_dataset_as_the_reference(drift, tmp_path):
    """The reference may be a dataset folder: its val clips against its test clips, both embedded by the model."""
    from components.drift import check_drift

    config = _config(drift, reference_splits=["val"], current_splits=["test"])
    summary = check_drift(drift.dataset, drift.dataset, tmp_path, config, model_dir=drift.model_dir)
    assert summary["passed"], summary["drifted"]
    assert summary["reference"]["kind"] == "dataset" and summary["current"]["kind"] == "dataset"
    assert summary["reference"]["clips"] + summary["current"]["clips"] == len(drift.held_out)


# ----------------------------------------------------------------------------------------------- fails


def _noise(wave, clip):
    rng = np.random.default_rng(zlib.crc32(clip.clip_id.encode()))
    return wave + rng.normal(0, 0.05, len(wave)).astype(np.float32)


def _band_limited(wave, clip):
    from cacara import audio

    return audio.resample(audio.resample(wave, SR, 8000), 8000, SR)


def _quieter(wave, clip):
    return wave * np.float32(10 ** (-30 / 20))


def _truncated(wave, clip):
    return wave[: int(0.3 * SR)]


def _tone(wave, clip):
    rng = np.random.default_rng(zlib.crc32(clip.clip_id.encode()))
    t = np.arange(int(rng.uniform(1.0, 4.0) * SR)) / SR
    return (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)).astype(np.float32)


SHIFTS = {
    # name: (transform, columns that must be among the drifted ones)
    "noise": (_noise, {"bandwidth_hz", "audio_embedding"}),  # hiss fills the band; quieter than the clips
    "resampled_8k_and_back": (_band_limited, {"bandwidth_hz"}),
    "30_db_quieter": (_quieter, {"rms_dbfs", "silence_ratio"}),
    "truncated_to_0.3_s": (_truncated, {"duration_s"}),
    "generated_tones": (_tone, {"audio_embedding", "emb_centroid_cos", "bandwidth_hz", "rms_dbfs"}),
}
#: What none of the shifts touches: these must not drift.
UNTOUCHED = {"orig_sample_rate", "caption_language", "caption_chars"}


@pytest.mark.parametrize("name", sorted(SHIFTS))
def test_a_shifted_batch_fails_on_the_columns_that_shifted(drift, name):
    transform, expected = SHIFTS[name]
    summary = _fails(drift, _source(drift, name, transform), name)
    assert expected <= set(summary["drifted"]), (name, summary["drifted"])
    assert not UNTOUCHED & set(summary["drifted"]), (name, summary["drifted"], "the source format and captions did not change")
    html = Path(summary["report_html"]).read_text(encoding="utf-8")
    for column in expected - {"audio_embedding"}:  # the report's own test rows say so too
        assert re.search(rf'"title": "Value Drift for column {column}", "description": "[^"]*", "state": "fail"', html)


def test_embeddings_from_another_model_fail(drift, other_model):
    """The same held-out clips, embedded by another model than the reference's."""
    summary = _fails(drift, drift.dataset, "other_model", drift.config, model_dir=other_model)
    assert {"audio_embedding", "emb_centroid_cos"} <= set(summary["drifted"])
    assert "duration_s" not in summary["drifted"] and "rms_dbfs" not in summary["drifted"], "the audio is the same"
    assert any("another model" in n for n in summary["notes"])


@pytest.fixture(scope="module")
def other_model(packaged, tmp_path_factory):
    """A model of the same shape trained from a random initialisation for one epoch: another space."""
    from cacara.config import EmbedTextConfig, TrainConfig
    from cacara.params import load_params
    from components.embed_text import embed_text
    from components.train import train

    root = tmp_path_factory.mktemp("other_model")
    params = load_params(overrides={"evaluate.english_only_text_encoder": "use-multilingual", "model.init": "random",
                                    "train.epochs": 1, "train.warmup_epochs": 0, "train.seed": 7})
    embed_text(packaged.dataset, root / "text_emb", EmbedTextConfig.from_params(params))
    train(packaged.dataset, root / "text_emb", root / "train", TrainConfig.from_params(params))
    return root / "train" / "model"


def test_warn_policy_reports_without_stopping(drift):
    summary = _check(drift, _source(drift, "quiet_warn", _quieter), _config(drift, current_splits=[], policy="warn"),
                     "warn")
    assert not summary["passed"] and "rms_dbfs" in summary["drifted"] and summary["policy"] == "warn"


# --------------------------------------------------------------------------------------- bad batches


def _write_dataset(root: Path, clips) -> Path:
    import shutil

    from cacara.manifest import write_manifest

    (root / "audio").mkdir(parents=True, exist_ok=True)
    for c in clips:
        shutil.copyfile(REPO / "data" / c.audio_path, root / c.audio_path)
    write_manifest(list(clips), root)
    return root


def test_empty_tiny_and_malformed_batches_get_a_clear_error(drift, tmp_path):
    from components.drift import DriftInputError

    cases = {
        "empty dataset": (_write_dataset(tmp_path / "empty", []), "no clips"),
        "tiny dataset": (_write_dataset(tmp_path / "tiny", drift.held_out[:3]), "fewer than drift.min_rows"),
        "no such folder": (tmp_path / "missing", "no such file or folder"),
        "empty log": (tmp_path / "requests-empty.jsonl", "no usable request records"),
        "garbage log": (tmp_path / "requests-garbage.jsonl", "no usable request records"),
    }
    (tmp_path / "requests-empty.jsonl").write_text("")
    (tmp_path / "requests-garbage.jsonl").write_bytes(b"\x00\xff not json\n{\"embedding\": [1, 2]}\n")
    for what, (current, message) in cases.items():
        with pytest.raises(DriftInputError, match=re.escape(message)):
            _check(drift, current, name=what.replace(" ", "_"))
    bad_manifest = tmp_path / "bad_manifest"
    bad_manifest.mkdir()
    (bad_manifest / "manifest.jsonl").write_text('{"clip_id": "a"\n')
    with pytest.raises(DriftInputError, match="malformed manifest.jsonl"):
        _check(drift, bad_manifest, name="bad_manifest")
    only_captions = _config(drift, current_splits=[], columns=["caption_chars", "caption_language"])
    log = _log(tmp_path / "log", drift, drift.held_out[:12])
    with pytest.raises(DriftInputError, match="none of drift.columns"):
        _check(drift, log.parent, only_captions, name="no_columns")


def test_a_new_dataset_is_measured_as_the_reference_was_and_a_log_measured_otherwise_is_refused(drift, tmp_path):
    """Params that differ from the reference's (here the silence threshold) do not change how the current
    batch is measured: the reference's settings do, and the summary says so. A log written with other
    settings cannot be compared with it."""
    from components.drift import DriftInputError

    config = drift.config.model_copy(update={"silence_rms_dbfs": -40.0})
    summary = _check(drift, drift.dataset, config, "other_settings")
    assert summary["passed"] and any("measured as the reference was" in n for n in summary["notes"])
    path = _log(tmp_path / "ok", drift, drift.held_out[:12])
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["measured_with"]["silence_rms_dbfs"] = -40.0
    (tmp_path / "ok" / path.name).write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(DriftInputError, match="different settings"):
        _check(drift, path.parent, name="log_other_settings")
    for line_no, line in enumerate(lines):
        r = json.loads(line)
        r["measured_with"]["silence_rms_dbfs"] = -40.0
        lines[line_no] = json.dumps(r)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DriftInputError, match=r"silence_rms_dbfs -40.0 \(reference -60.0\)"):
        _check(drift, path.parent, name="log_other_settings_all")


# ------------------------------------------------------------------------------------------- the log


def _log(tmp_path: Path, drift, clips, endpoint="embed_audio", max_bytes=50 * 2**20, backups=3, rate_of=None,
         model=None):
    """What the service writes for uploads of ``clips`` (decoded from files at their source's rate), as the
    served model (``model``: another model's sha256)."""
    from cacara import audio
    from cacara.embed import Embedder
    from components.drift import DriftLog, model_sha, profile_settings

    settings = profile_settings(drift.reference)
    log = DriftLog(tmp_path, max_bytes, backups, settings["silence_rms_dbfs"], settings["clip_level"],
                   model=model or model_sha(drift.model_dir))
    embedder = Embedder.load(drift.model_dir)
    for clip in clips:
        wave = audio.decode(drift.dataset / clip.audio_path, SR).samples
        rate = rate_of(clip) if rate_of else clip.orig_sample_rate
        upload = tmp_path / "upload.wav"
        sf.write(str(upload), audio.resample(wave, SR, rate), rate, subtype="PCM_16")
        decoded = audio.decode(upload, SR)
        log.append(decoded, embedder.embed_waveforms([decoded.samples])[0], endpoint)
    log.close()
    return log.path


def test_the_serving_log_passes_then_flags_a_truncated_line_and_a_new_sample_rate(drift, tmp_path):
    from components.drift import read_log

    path = _log(tmp_path / "log", drift, drift.held_out)
    record = json.loads(path.read_text().splitlines()[0])
    assert set(record) == {"time", "endpoint", "model", "measured_with", "duration_s", "rms_dbfs", "silence_ratio",
                           "clipping_ratio", "bandwidth_hz", "orig_sample_rate", "orig_channels", "embedding"}, \
        "no audio, no text"
    with open(path, "a", encoding="utf-8") as f:  # the writer was killed mid-line
        f.write(path.read_text().splitlines()[0][:200])
    batch = read_log(path.parent)
    assert len(batch.features) == len(drift.held_out)
    assert f"1 of {len(drift.held_out) + 1} log lines skipped (not whole records)" in batch.notes
    summary = _check(drift, path.parent, name="log_pass")
    assert summary["passed"], summary["drifted"]
    assert "caption_language" in summary["columns_not_compared"], "the log holds no text"
    phone = _log(tmp_path / "phone", drift, drift.held_out, rate_of=lambda c: 8000)
    assert "orig_sample_rate" in _fails(drift, phone.parent, "log_8k")["drifted"]
    # Records of the model served before a rollout (another space) are left out, and counted.
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    old_model = _log(tmp_path / "old_model", drift, drift.held_out[:20], rate_of=lambda c: 8000, model="f" * 64)
    (mixed / "requests-old-pod.jsonl").write_bytes(old_model.read_bytes())
    (mixed / "requests-new-pod.jsonl").write_bytes(path.read_bytes())
    summary = _check(drift, mixed, name="log_mixed")
    assert summary["passed"] and summary["current"]["clips"] == len(drift.held_out)
    assert any("20 records of other models left out" in n for n in summary["notes"])


def test_large_batches_are_sampled_and_tested_by_p_value(drift):
    """Above 1000 reference rows Evidently's defaults turn to distances, which the p-value threshold does
    not fit; every column keeps a p-value test, and batches above drift.max_rows are sampled."""
    from components.drift import Batch, compare, load_profile

    real = load_profile(drift.reference)
    rng = np.random.default_rng(1)

    def resampled(rows: int) -> Batch:
        pick = rng.integers(0, len(real.features), rows)
        return Batch(real.features.iloc[pick].reset_index(drop=True), real.embeddings[pick], "resampled", "dataset",
                     model=real.model)

    config = _config(drift, max_rows=1500)
    _, summary = compare(resampled(1800), resampled(1200), config)
    assert summary["passed"], summary["drifted"]
    assert {c["test"] for c in summary["columns"].values()} == {"ks", "chisquare"}, summary["columns"]
    assert summary["reference"]["clips"] == 1500 and summary["current"]["clips"] == 1200
    assert any("a random 1500 of its 1800 clips" in n for n in summary["notes"])


def test_the_log_rotates_within_its_bound(drift, tmp_path):
    clips = (drift.held_out * 3)[:40]
    path = _log(tmp_path, drift, clips, max_bytes=60_000, backups=2)
    files = sorted(tmp_path.glob(path.name + "*"))
    assert len(files) == 3, files
    record_bytes = max(len(line) + 1 for f in files for line in f.read_text().splitlines())
    assert all(f.stat().st_size <= 60_000 + record_bytes for f in files)
    from components.drift import read_log

    assert 0 < len(read_log(tmp_path).features) < len(clips), "old records were dropped, the rest kept whole"


# -------------------------------------------------------------------------------------------- the CLI


def test_cli_exits_1_naming_the_drifted_columns_and_0_on_a_pass(drift, tmp_path):
    quiet = _source(drift, "cli_quiet", _quieter)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    base = [sys.executable, "-m", "cacara.cli", "drift", "--reference", str(drift.reference)]
    failed = subprocess.run(base + ["--current", str(quiet), "--out", str(tmp_path / "q"), "--set", "drift.current_splits=[]"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert failed.returncode == 1, failed.stderr[-2000:]
    assert "drift gate failed: drifted" in failed.stderr and "rms_dbfs" in failed.stderr
    assert "DRIFTED" in failed.stdout and (tmp_path / "q" / "drift_report.html").exists()
    passed = subprocess.run(base + ["--current", str(drift.dataset), "--out", str(tmp_path / "p")],
                            capture_output=True, text=True, timeout=600, env=env)
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert "PASSED" in passed.stdout
    summary = json.loads((tmp_path / "p" / "drift.json").read_text())
    assert summary["passed"] and summary["drifted"] == []


def test_html_report_has_the_tests_and_the_embeddings_section(drift):
    summary = _check(drift, drift.dataset, drift.config, "html")
    html = Path(summary["report_html"]).read_text(encoding="utf-8")
    assert "window.drawDashboard(" in html and "<script src=" not in html, "one self-contained file, offline"
    for column in summary["columns"]:
        assert f"Value Drift for column {column}" in html
    assert "Drift in embeddings" in html and "Share of Drifted Columns" in html
    tests = re.findall(r'"state": "(success|fail|warning|error)"', html)
    assert len(tests) >= len(summary["columns"]) + 1 and "fail" not in tests
