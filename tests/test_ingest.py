"""ingest: every kind of bad input gets its documented quarantine reason, and every good row survives."""

from __future__ import annotations

import json
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile as sf

from cacara.manifest import read_manifest
from cacara.config import IngestConfig
from components.ingest import IngestFailed, ingest, merge_shards
from tests.conftest import write_tone


def run(source, out, params, **kwargs):
    """``ingest`` as ``dvc repro`` calls it: the output folder handed back as the previous dataset."""
    return ingest(source, out, IngestConfig.from_params(params), previous=out, **kwargs)


def _row(clip_id: str, audio: str, en: str = "A dog barks.", **caps) -> str:
    captions = {"en": [en], **{k: [v] for k, v in caps.items()}}
    return json.dumps({"clip_id": clip_id, "audio": audio, "captions": captions, "license": "CC0"})


@pytest.fixture
def messy_source(tmp_path: Path) -> Path:
    """A manifest with good clips in several formats and one of every kind of bad row."""
    src = tmp_path / "src"
    a = src / "audio"
    write_tone(a / "good16.wav", 1.0, 16000)
    write_tone(a / "good8k.wav", 1.5, 8000, freq=300)
    write_tone(a / "stereo48k.flac", 2.0, 48000, channels=2, freq=600)
    write_tone(a / "vorbis.ogg", 1.0, 44100, freq=500)
    write_tone(a / "dup.wav", 1.0, 16000)
    write_tone(a / "nocaption.wav", 1.0, 16000)
    (a / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage that is not audio" * 10)
    (a / "zero.wav").write_bytes(b"")
    sf.write(str(a / "silence.wav"), np.zeros(16000, dtype=np.float32), 16000)
    write_tone(a / "long.wav", 31.0, 16000)
    write_tone(a / "short.wav", 0.1, 16000)
    lines = [
        _row("good16", "audio/good16.wav", fr="Un chien aboie."),
        _row("good8k", "audio/good8k.wav"),
        _row("stereo48k", "audio/stereo48k.flac", de="Ein Hund bellt."),
        _row("vorbis", "audio/vorbis.ogg"),
        _row("dup", "audio/dup.wav"),
        _row("dup", "audio/good16.wav"),
        _row("nocaption", "audio/nocaption.wav", en="   "),
        _row("corrupt", "audio/corrupt.wav"),
        _row("zero", "audio/zero.wav"),
        _row("silence", "audio/silence.wav"),
        _row("long", "audio/long.wav"),
        _row("short", "audio/short.wav"),
        _row("missing", "audio/not-there.wav"),
        '{"clip_id": "broken", "audio": ',
    ]
    body = ("\n".join(lines) + "\n").encode("utf-8")
    body += b'{"clip_id": "latin1", "audio": "audio/good16.wav", "captions": {"en": ["Caf\xe9 noise."]}}\n'
    (src / "manifest.jsonl").write_bytes(body)
    return src


EXPECTED_REASONS = {
    "dup": "duplicate_id", "nocaption": "empty_caption", "corrupt": "undecodable", "zero": "empty",
    "silence": "silent", "long": "too_long", "short": "too_short", "missing": "missing_file",
}


def test_each_bad_row_is_quarantined_with_its_reason(messy_source, tmp_path, params):
    params["ingest"]["max_bad_fraction"] = 0.9
    result = run(messy_source, tmp_path / "out", params)
    kept = {c.clip_id: c for c in read_manifest(tmp_path / "out")}
    assert set(kept) == {"good16", "good8k", "stereo48k", "vorbis", "dup"}
    by_id = {q.clip_id: q.reason for q in result.quarantined if q.clip_id}
    for clip_id, reason in EXPECTED_REASONS.items():
        assert by_id[clip_id] == reason, (clip_id, by_id.get(clip_id))
    reasons = [q.reason for q in result.quarantined]
    assert reasons.count("malformed_row") == 1 and reasons.count("invalid_utf8") == 1
    details = {q.clip_id: q.detail for q in result.quarantined if q.clip_id}
    for clip_id in ("corrupt", "zero", "silence", "long", "short"):
        assert f"{clip_id}.wav" in details[clip_id] and "0x" not in details[clip_id], details[clip_id]
    report = json.loads((tmp_path / "out" / "quarantine.json").read_text())
    assert report["kept"] == 5 and len(report["quarantined"]) == len(result.quarantined) == 10
    assert report["dropped_captions"] == [{"clip_id": "nocaption", "language": "en", "index": 0}]


def test_good_rows_are_resampled_to_16k_mono_and_keep_their_origin(messy_source, tmp_path, params):
    params["ingest"]["max_bad_fraction"] = 0.9
    run(messy_source, tmp_path / "out", params)
    kept = {c.clip_id: c for c in read_manifest(tmp_path / "out")}
    assert (kept["good8k"].orig_sample_rate, kept["good8k"].orig_channels) == (8000, 1)
    assert (kept["stereo48k"].orig_sample_rate, kept["stereo48k"].orig_channels) == (48000, 2)
    assert kept["stereo48k"].captions == {"en": ["A dog barks."], "de": ["Ein Hund bellt."]}
    for clip in kept.values():
        info = sf.info(str(tmp_path / "out" / clip.audio_path))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert abs(info.duration - clip.duration_s) < 1e-3
        assert clip.split in {"train", "val", "test"}
    assert abs(kept["stereo48k"].duration_s - 2.0) < 1e-3


def test_too_many_bad_rows_fail_the_run_after_writing_the_report(messy_source, tmp_path, params):
    params["ingest"]["max_bad_fraction"] = 0.25
    with pytest.raises(IngestFailed, match="max_bad_fraction"):
        run(messy_source, tmp_path / "out", params)
    assert (tmp_path / "out" / "quarantine.json").exists()
    assert len(read_manifest(tmp_path / "out")) == 5


def test_rerun_is_idempotent_and_reuses_unchanged_clips(messy_source, tmp_path, params):
    params["ingest"]["max_bad_fraction"] = 0.9
    first = run(messy_source, tmp_path / "out", params)
    before = (tmp_path / "out" / "manifest.jsonl").read_bytes()
    second = run(messy_source, tmp_path / "out", params)
    assert first.reused == 0 and second.reused == len(second.clips) == 5
    assert (tmp_path / "out" / "manifest.jsonl").read_bytes() == before
    # Changing the audio settings invalidates the cache.
    params["ingest"]["audio_format"] = "wav"
    third = run(messy_source, tmp_path / "out", params)
    assert third.reused == 0
    assert sorted(p.suffix for p in (tmp_path / "out" / "audio").iterdir()) == [".wav"] * 5


def test_splits_are_deterministic_and_follow_the_seed(messy_source, tmp_path, params):
    params["ingest"]["max_bad_fraction"] = 0.9
    a = {c.clip_id: c.split for c in run(messy_source, tmp_path / "a", params).clips}
    b = {c.clip_id: c.split for c in run(messy_source, tmp_path / "b", params).clips}
    assert a == b


def test_clotho_csv_with_audio_beside_it(tmp_path, params):
    src = tmp_path / "clotho"
    for i in range(3):
        write_tone(src / f"clip {i}.wav", 1.0, 44100, freq=200 + 100 * i)
    rows = ["file_name,caption_1,caption_2,caption_3,caption_4,caption_5"]
    rows += [f'clip {i}.wav,"a, b {i}",c{i},d{i},e{i},f{i}' for i in range(3)]
    (src / "captions.csv").write_text("\n".join(rows) + "\n")
    result = run(src, tmp_path / "out", params)
    assert result.format == "clotho" and not result.quarantined
    clip = {c.clip_id: c for c in result.clips}["clip 1.wav"]
    assert clip.captions == {"en": ["a, b 1", "c1", "d1", "e1", "f1"]}
    assert " " not in clip.audio_path


def test_clotho_layout_with_split_folder(tmp_path, params):
    """Clotho's own layout: clotho_captions_development.csv beside development/."""
    src = tmp_path / "clotho"
    write_tone(src / "development" / "a b.wav", 1.0, 44100)
    (src / "clotho_captions_development.csv").write_text(
        "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\na b.wav,one,two,three,four,five\n")
    result = run(src / "clotho_captions_development.csv", tmp_path / "out", params)
    assert [c.clip_id for c in result.clips] == ["a b.wav"] and not result.quarantined


def test_audiocaps_csv_groups_captions_per_clip(tmp_path, params):
    src = tmp_path / "audiocaps"
    write_tone(src / "audio" / "yt1_30.wav", 2.0, 32000)
    write_tone(src / "audio" / "yt2_0.wav", 2.0, 32000, freq=900)
    rows = ["audiocap_id,youtube_id,start_time,caption", "1,yt1,30,A car passes.", "2,yt1,30,An engine hums.",
            "3,yt2,0,Birds chirp.", "4,yt3,10,No audio for this one."]
    (src / "test.csv").write_text("\n".join(rows) + "\n")
    params["ingest"]["max_bad_fraction"] = 0.5
    result = run(src, tmp_path / "out", params)
    assert result.format == "audiocaps"
    kept = {c.clip_id: c for c in result.clips}
    assert kept["yt1_30"].captions == {"en": ["A car passes.", "An engine hums."]}
    assert kept["yt1_30"].extra["audiocap_ids"] == ["1", "2"]
    assert [(q.clip_id, q.reason) for q in result.quarantined] == [("yt3_10", "missing_file")]


def test_csv_manifest_with_language_columns(tmp_path, params):
    src = tmp_path / "csv"
    write_tone(src / "a.wav", 1.0)
    (src / "manifest.csv").write_text("clip_id,audio,caption,caption_fr,caption_pt_BR\na,a.wav,A bell.,Une cloche.,Um sino.\n")
    result = run(src, tmp_path / "out", params)
    assert result.format == "manifest"
    assert result.clips[0].captions == {"en": ["A bell."], "fr": ["Une cloche."], "pt-BR": ["Um sino."]}


def test_fsspec_url_source(tmp_path, params):
    """Any fsspec URL works: the in-memory filesystem stands for s3:// or gs:// here."""
    fs = fsspec.filesystem("memory")
    local = write_tone(tmp_path / "x.wav", 1.0, 22050)
    fs.pipe("/bucket/ds/audio/x.wav", local.read_bytes())
    fs.pipe("/bucket/ds/manifest.jsonl", (_row("x", "audio/x.wav") + "\n").encode())
    result = run("memory://bucket/ds", tmp_path / "out", params)
    assert [c.clip_id for c in result.clips] == ["x"] and result.clips[0].orig_sample_rate == 22050


def test_oversized_file_is_quarantined_without_decoding(tmp_path, params):
    src = tmp_path / "src"
    write_tone(src / "big.wav", 3.0, 16000)
    write_tone(src / "ok.wav", 1.0, 16000)
    (src / "manifest.jsonl").write_text(_row("big", "big.wav") + "\n" + _row("ok", "ok.wav") + "\n")
    params["audio"]["max_file_bytes"] = 60000
    params["ingest"]["max_bad_fraction"] = 0.5
    result = run(src, tmp_path / "out", params)
    assert [(q.clip_id, q.reason) for q in result.quarantined] == [("big", "too_large")]
    assert [c.clip_id for c in result.clips] == ["ok"]


def test_shards_merge_into_the_dataset_one_shard_writes(messy_source, tmp_path, params):
    """Large sources fan out over shards (by clip id, so duplicate rows meet in one shard); the merged
    dataset is byte for byte the single-shard one, and the bad-fraction gate sees every row."""
    params["ingest"]["max_bad_fraction"] = 0.9
    config = IngestConfig.from_params(params)
    whole = ingest(messy_source, tmp_path / "whole", config)
    parts = [ingest(messy_source, tmp_path / f"shard{i}", config, shard=i, num_shards=3) for i in range(3)]
    assert sum(len(p.clips) for p in parts) == len(whole.clips) and all(p.total_rows for p in parts)
    merged = merge_shards([tmp_path / f"shard{i}" for i in range(3)], tmp_path / "merged", config)
    for name in ("manifest.jsonl", "quarantine.json"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "merged" / "audio").iterdir()) == \
        sorted(p.name for p in (tmp_path / "whole" / "audio").iterdir())
    assert merged.bad_fraction == whole.bad_fraction
    strict = IngestConfig.from_params({**params, "ingest": {**params["ingest"], "max_bad_fraction": 0.25}})
    for i in range(3):  # no shard gates on its own ...
        ingest(messy_source, tmp_path / f"s{i}", strict, shard=i, num_shards=3)
    with pytest.raises(IngestFailed, match="max_bad_fraction"):  # ... the merge gates on all rows
        merge_shards([tmp_path / f"s{i}" for i in range(3)], tmp_path / "m2", strict)
    with pytest.raises(ValueError, match="shard 3 is not in 0..2"):
        ingest(messy_source, tmp_path / "x", config, shard=3, num_shards=3)


def test_previous_dataset_is_an_input_and_the_output_is_never_read(messy_source, tmp_path, params):
    """kfp gives every task a fresh output folder: reuse comes from ``previous`` only."""
    params["ingest"]["max_bad_fraction"] = 0.9
    config = IngestConfig.from_params(params)
    ingest(messy_source, tmp_path / "first", config)
    again = ingest(messy_source, tmp_path / "second", config, previous=tmp_path / "first")
    assert again.reused == len(again.clips) == 5
    assert (tmp_path / "second" / "manifest.jsonl").read_bytes() == (tmp_path / "first" / "manifest.jsonl").read_bytes()
    for clip in again.clips:
        assert (tmp_path / "second" / clip.audio_path).read_bytes() == (tmp_path / "first" / clip.audio_path).read_bytes()
    fresh = ingest(messy_source, tmp_path / "first", config)  # no previous: the old output is not reused
    assert fresh.reused == 0
