"""Hostile input and faults: reads confined to the source, settings refused before work, audio that would
decode to hours refused from its header, a busy output folder refused, and kills survived.

docs/robustness.md lists every kind tried here and elsewhere, by test name (tests/test_robustness_table.py
keeps the two in step).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import fsspec
import numpy as np
import pytest
import soundfile as sf

from cacara import audio
from cacara.config import ConfigError, IngestConfig
from cacara.files import OutputBusy, exclusive_output
from cacara.manifest import read_manifest
from cacara.params import load_params
from cacara import sources
from components.ingest import ingest
from tests.conftest import REPO, write_tone

CLI = [sys.executable, "-m", "cacara.cli"]


def _row(clip_id: str, audio_ref: str, caption: str = "A dog barks.") -> str:
    return json.dumps({"clip_id": clip_id, "audio": audio_ref, "captions": {"en": [caption]}}, ensure_ascii=False)


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path or URL ingest opens (local files with ``open``, others through fsspec), with what it
    resolves to: what a refused row names must never be among them."""
    import builtins

    seen: list[str] = []
    real_fsspec, real_open = fsspec.open, builtins.open

    def spy_fsspec(url, *args, **kwargs):
        seen.append(str(url))
        return real_fsspec(url, *args, **kwargs)

    def spy_open(path, *args, **kwargs):
        seen.extend([str(path), os.path.realpath(path)])
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(sources.fsspec, "open", spy_fsspec)
    monkeypatch.setattr(sources, "open", spy_open, raising=False)
    return seen


def _config(params, **ingest_settings) -> IngestConfig:
    params["ingest"].update({"max_bad_fraction": 0.9, **ingest_settings})
    return IngestConfig.from_params(params)


def _local_case(kind: str, tmp: Path) -> tuple[Path, str]:
    """(source folder, the hostile row's audio reference) for one way out of the source root."""
    src, outside = tmp / "src", tmp / "outside"
    write_tone(outside / "secret.wav", 1.0, 16000)
    src.mkdir(parents=True, exist_ok=True)
    if kind == "absolute_path":
        return src, str(outside / "secret.wav")
    if kind == "path_escape":
        return src, "../outside/secret.wav"
    if kind == "path_escape_deep":
        return src, "audio/../../outside/secret.wav"
    if kind == "symlink_escape":
        (src / "audio").mkdir(exist_ok=True)
        (src / "audio" / "link.wav").symlink_to(outside / "secret.wav")
        return src, "audio/link.wav"
    if kind == "symlinked_folder_escape":
        (src / "shared").symlink_to(outside, target_is_directory=True)
        return src, "shared/secret.wav"
    if kind == "system_file":
        return src, "/etc/passwd"
    if kind == "symlink_then_dotdot":  # the kernel follows evil/ first, then applies ..
        (outside / "sub").mkdir()
        (src / "evil").symlink_to(outside / "sub", target_is_directory=True)
        return src, "evil/../secret.wav"
    if kind == "file_url":
        return src, f"file://{outside / 'secret.wav'}"
    raise AssertionError(kind)


LOCAL_ESCAPES = {"absolute_path": "absolute_path", "path_escape": "path_escape", "path_escape_deep": "path_escape",
                 "symlink_escape": "symlink_escape", "symlinked_folder_escape": "symlink_escape",
                 "system_file": "absolute_path", "symlink_then_dotdot": "symlink_escape", "file_url": "absolute_path"}


@pytest.mark.parametrize("kind", sorted(LOCAL_ESCAPES))
def test_audio_outside_the_source_root_is_quarantined_unread(kind, tmp_path, params, opened):
    src, ref = _local_case(kind, tmp_path)
    write_tone(src / "good.wav", 1.0, 16000)
    (src / "manifest.jsonl").write_text(_row("hostile", ref) + "\n" + _row("good", "good.wav") + "\n")
    result = ingest(src, tmp_path / "out", _config(params))
    assert [c.clip_id for c in result.clips] == ["good"]
    [q] = result.quarantined
    assert (q.clip_id, q.reason) == ("hostile", LOCAL_ESCAPES[kind])
    assert ref.rsplit("/", 1)[-1] in q.detail and "ingest.allowed_roots" in q.detail, q.detail
    assert not any("secret" in url or "passwd" in url for url in opened), opened


REMOTE_ESCAPES = {
    "other_bucket": "memory://other/secret.wav",
    "sibling_prefix": "memory://bucket/ds-private/secret.wav",
    "remote_dotdot": "../ds-private/secret.wav",
    "local_file_from_remote_manifest": "/etc/passwd",
    "percent_encoded_dotdot": "memory://bucket/ds/%2e%2e/ds-private/secret.wav",
    "chained_url": "simplecache::memory://other/secret.wav",
}


@pytest.mark.parametrize("kind", sorted(REMOTE_ESCAPES))
def test_a_remote_manifest_reads_only_its_own_prefix(kind, tmp_path, params, opened):
    """The in-memory filesystem stands for s3:// or gs://: a manifest in bucket/ds may name bucket/ds only."""
    fs = fsspec.filesystem("memory")
    tone = write_tone(tmp_path / "x.wav", 1.0, 16000).read_bytes()
    for path in ("/bucket/ds/audio/good.wav", "/other/secret.wav", "/bucket/ds-private/secret.wav"):
        fs.pipe(path, tone)
    fs.pipe("/bucket/ds/manifest.jsonl",
            (_row("hostile", REMOTE_ESCAPES[kind]) + "\n" + _row("good", "audio/good.wav") + "\n").encode())
    try:
        result = ingest("memory://bucket/ds", tmp_path / "out", _config(params))
    finally:
        fs.rm("/bucket", recursive=True)
        fs.rm("/other", recursive=True)
    assert [c.clip_id for c in result.clips] == ["good"]
    assert [(q.clip_id, q.reason) for q in result.quarantined] == [("hostile", "outside_root")]
    assert not any("secret" in url or "passwd" in url for url in opened), opened


def test_allowed_roots_let_a_listed_folder_in(tmp_path, params):
    src, ref = _local_case("absolute_path", tmp_path)
    (src / "manifest.jsonl").write_text(_row("shared", ref) + "\n")
    result = ingest(src, tmp_path / "out", _config(params, allowed_roots=[str(tmp_path / "outside")]))
    assert [c.clip_id for c in result.clips] == ["shared"] and not result.quarantined
    for everything in ("/", "//", "/tmp/..", "s3://", "file:///", " "):
        with pytest.raises(ConfigError, match="allowed_roots.*not a whole filesystem"):
            _config(params, allowed_roots=[everything])


def test_a_symlink_swapped_after_the_check_is_caught_when_opened(tmp_path):
    """The name is checked before opening, and what was opened is checked again: a link turned to point
    outside in between is refused, not read."""
    src, outside = tmp_path / "src", tmp_path / "outside"
    inside = write_tone(src / "inside.wav", 1.0, 16000)
    write_tone(outside / "secret.wav", 1.0, 16000)
    link = src / "clip.wav"
    link.symlink_to(inside)
    confinement = sources.Confinement.of(str(src))
    assert confinement.refusal(str(link)) is None
    link.unlink()
    link.symlink_to(outside / "secret.wav")
    with pytest.raises(sources.Escaped, match="secret.wav"):
        confinement.open(str(link))
    with confinement.open(str(inside)) as fh:
        assert fh.read(4) == b"RIFF"


def test_a_file_replaced_under_the_dataset_is_decoded_again(tmp_path, params):
    """A killed run (or one with other settings) may leave its file under a clip's name before it wrote
    its manifest: the next run checks each reused file against the manifest's sha256."""
    src = tmp_path / "src"
    for i in range(3):
        write_tone(src / f"c{i}.wav", 1.0, 16000, freq=300 + 100 * i)
    (src / "manifest.jsonl").write_text("".join(_row(f"c{i}", f"c{i}.wav") + "\n" for i in range(3)))
    out = tmp_path / "out"
    first = ingest(src, out, _config(params), previous=out)
    victim = out / first.clips[0].audio_path
    original = victim.read_bytes()
    sf.write(str(victim), np.zeros(22050, np.float32) + 0.1, 22050)  # what a run at other settings wrote
    again = ingest(src, out, _config(params), previous=out)
    assert again.reused == 2 and victim.read_bytes() == original


def test_every_error_detail_names_the_file_or_the_line(tmp_path, params):
    src = tmp_path / "src"
    write_tone(src / "good.wav", 1.0, 16000)
    (src / "notaudio.wav").write_bytes(b"plain text, not audio\n" * 20)
    lines = [_row("good", "good.wav"), _row("text", "notaudio.wav"), '{"clip_id": "cut", "audio": ', "[1, 2]"]
    (src / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    result = ingest(src, tmp_path / "out", _config(params))
    details = {q.row: (q.reason, q.detail) for q in result.quarantined}
    assert details[2][0] == "undecodable" and "notaudio.wav" in details[2][1] and "0x" not in details[2][1]
    assert details[3][0] == details[4][0] == "malformed_row"
    assert details[3][1].startswith("manifest.jsonl line 3:") and details[4][1].startswith("manifest.jsonl line 4:")


def test_captions_with_unicode_line_separators_stay_one_row(tmp_path, params):
    """JSON allows U+2028, U+0085 and friends unescaped in a string; they must not cut the row in two."""
    src = tmp_path / "src"
    write_tone(src / "a.wav", 1.0, 16000)
    write_tone(src / "b.wav", 1.0, 16000, freq=300)
    caption = "A dog barks\u2028then a door\u0085closes\x1c."
    (src / "manifest.jsonl").write_text(_row("a", "a.wav", caption) + "\r\n" + _row("b", "b.wav") + "\n",
                                        encoding="utf-8")
    result = ingest(src, tmp_path / "out", _config(params))
    assert not result.quarantined and sorted(c.clip_id for c in result.clips) == ["a", "b"]
    assert {c.clip_id: c.captions["en"] for c in result.clips}["a"] == [" ".join(caption.split())]


# ---------------------------------------------------------------------------------------------- settings

BAD_SETTINGS = {
    "below_bound": ("train.epochs=-1", "train.epochs: Input should be greater than or equal to 1 (got -1)"),
    "wrong_type": ("train.lr_head=abc", "train.lr_head: Input should be a valid number"),
    "unknown_key": ("train.nonexistent=1", "unknown parameter 'train.nonexistent'; train has augment_gain_db"),
    "unknown_section": ("nosection.x=1", "unknown parameter 'nosection.x'; params.yaml has audio"),
    "not_a_choice": ("train.precision=fp8", "train.precision: Input should be 'auto', 'fp32' or 'bf16'"),
    "inconsistent": ("audio.min_duration_s=40", "min_duration_s (40.0) must be below max_duration_s"),
    "whole_filesystem_root": ("ingest.allowed_roots=[/]", "allowed_roots entry '/'"),
}


@pytest.mark.parametrize("kind", sorted(BAD_SETTINGS))
def test_bad_settings_are_refused_in_one_line_before_any_work(kind, tmp_path):
    override, message = BAD_SETTINGS[kind]
    out = tmp_path / "out"
    proc = subprocess.run([*CLI, "ingest", "--source", str(REPO / "data"), "--out", str(out), "--set", override],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if " ERROR " in ln]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_pipeline_parameters_are_validated_at_submit_time_too():
    """The same typed configs check what a kfp run would be given, before anything is compiled or sent."""
    from pipelines.submit import submit

    params = load_params(overrides={"cluster.ingest_shards": 0})
    with pytest.raises(ConfigError, match=r"cluster.ingest_shards: Input should be greater than or equal to 1"):
        submit(params, host="http://127.0.0.1:9", md5="0" * 32)


# --------------------------------------------------------------------------------------- resource bounds

def _constant_flac(path: Path, seconds: int, sr: int = 8000) -> Path:
    """A constant signal compresses to almost nothing in FLAC: an hour of it weighs under 100 KB."""
    with sf.SoundFile(str(path), "w", sr, 1, format="FLAC", subtype="PCM_16") as f:
        block = np.full(sr * 10, 0.25, np.float32)
        for _ in range(seconds // 10):
            f.write(block)
    return path


def _unknown_length(flac: bytes) -> bytes:
    """Zero STREAMINFO's total-samples field, as a streamed encoder leaves it: the header gives no length."""
    raw = bytearray(flac)
    info = 8  # "fLaC" + the metadata block header
    raw[info + 13] &= 0xF0
    raw[info + 14:info + 18] = b"\0\0\0\0"
    return bytes(raw)


def _many_channels() -> bytes:
    import io

    buf = io.BytesIO()
    sf.write(buf, np.full((50, 256), 0.1, np.float32), 192000, format="WAV", subtype="PCM_16")
    return buf.getvalue()


@pytest.fixture(scope="module")
def hour_flac(tmp_path_factory) -> Path:
    return _constant_flac(tmp_path_factory.mktemp("hour") / "hour.flac", 3600)


@pytest.mark.parametrize("kind", ["header_says_an_hour", "header_gives_no_length", "many_channels_at_192k"])
def test_audio_that_would_decode_to_hours_is_refused_with_bounded_memory(kind, hour_flac, params):
    """Decoded in full, the hour is 28.8 M samples (115 MB as float32, twice that after resampling)."""
    raw = {"header_says_an_hour": lambda: hour_flac.read_bytes(),
           "header_gives_no_length": lambda: _unknown_length(hour_flac.read_bytes()),
           "many_channels_at_192k": _many_channels}[kind]()
    assert len(raw) < 200_000
    a = IngestConfig.from_params(params).audio
    tracemalloc.start()
    try:
        with pytest.raises(audio.AudioError) as refused:
            audio.decode(raw, a.sample_rate, max_bytes=a.max_file_bytes, max_seconds=a.max_duration_s)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.reason == ("too_many_samples" if kind == "many_channels_at_192k" else "too_long")
    # At most max_duration_s of 8 kHz audio is ever read (1 MB); the whole hour would be 115 MB.
    assert peak < 20e6, f"{peak / 1e6:.1f} MB traced while refusing"


def test_ingest_refuses_the_hour_from_its_header(hour_flac, tmp_path, params):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(hour_flac, src / "hour.flac")
    write_tone(src / "good.wav", 1.0, 16000)
    (src / "manifest.jsonl").write_text(_row("hour", "hour.flac") + "\n" + _row("good", "good.wav") + "\n")
    config = _config(params)
    tracemalloc.start()
    try:
        result = ingest(src, tmp_path / "out", config)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Neither the hour nor a read buffer of audio.max_file_bytes (100 MiB) is ever allocated.
    assert peak < 20e6, f"{peak / 1e6:.1f} MB traced"
    [q] = result.quarantined
    assert (q.clip_id, q.reason) == ("hour", "too_long") and "by its header" in q.detail and "hour.flac" in q.detail
    assert [c.clip_id for c in result.clips] == ["good"]


# ----------------------------------------------------------------------------------------------- faults

def _hold(out: Path) -> subprocess.Popen:
    """Another process that holds ``out`` the way a running ingest does, until it is killed."""
    code = ("import sys, time\nfrom cacara.files import exclusive_output\n"
            "with exclusive_output(sys.argv[1], 'ingest'):\n    print('held', flush=True)\n    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_the_same_folder_is_refused(tmp_path, params):
    src = tmp_path / "src"
    write_tone(src / "good.wav", 1.0, 16000)
    (src / "manifest.jsonl").write_text(_row("good", "good.wav") + "\n")
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        with pytest.raises(OutputBusy, match=rf"another run \(ingest, pid {holder.pid} on .* since .*\) is writing"):
            ingest(src, out, _config(params))
        proc = subprocess.run([*CLI, "ingest", "--source", str(src), "--out", str(out)], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
        assert not (out / "manifest.jsonl").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: no stale lock blocks the next run.
    assert [c.clip_id for c in ingest(src, out, _config(params)).clips] == ["good"]
    with exclusive_output(out, "test"):  # and this process may take the folder again
        pass


def _busy_source(src: Path, n: int) -> Path:
    """Clips that take a while each (48 kHz stereo, resampled), so a kill lands in the middle of the run."""
    rows = []
    for i in range(n):
        write_tone(src / "audio" / f"c{i:02d}.flac", 4.0, 48000, channels=2, freq=200 + 20 * i)
        rows.append(_row(f"c{i:02d}", f"audio/c{i:02d}.flac"))
    (src / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return src


def _final_files(out: Path) -> list[Path]:
    return sorted(p for p in (out / "audio").iterdir() if not p.name.endswith(".tmp"))


@pytest.mark.slow
def test_sigkill_during_ingest_leaves_no_partial_file_and_the_rerun_gives_the_same_dataset(tmp_path, params):
    src = _busy_source(tmp_path / "src", 24)
    out = tmp_path / "out"
    cmd = [*CLI, "ingest", "--source", str(src), "--out", str(out), "--previous", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "audio").is_dir() and len(_final_files(out)) >= 6:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "ingest finished before it could be killed"
    written = _final_files(out)
    assert 6 <= len(written) < 24 and not (out / "manifest.jsonl").exists()
    for f in written:  # whatever carries a final name is whole
        info = sf.info(str(f))
        assert (info.samplerate, info.frames) == (16000, 64000), f
    reference = ingest(src, tmp_path / "reference", IngestConfig.from_params(params))
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=600)
    for name in ("manifest.jsonl", "quarantine.json"):
        got = (out / name).read_text().replace(str(out), "OUT")
        want = (tmp_path / "reference" / name).read_text().replace(str(tmp_path / "reference"), "OUT")
        assert got == want, name
    assert [p.name for p in (out / "audio").iterdir()] and \
        sorted(p.name for p in (out / "audio").iterdir()) == sorted(c.audio_path.split("/")[1] for c in reference.clips)
    for clip in read_manifest(out):
        assert (out / clip.audio_path).read_bytes() == (tmp_path / "reference" / clip.audio_path).read_bytes()


@pytest.mark.slow
def test_sigkill_during_training_then_resume_gives_the_same_weights(tiny_corpus, tmp_path):
    """Not a graceful stop: the process is killed once its first epoch is checkpointed."""
    from safetensors.torch import load_file

    dataset, text_emb, params = tiny_corpus
    overrides = ["model.text_encoder=use-multilingual", "train.epochs=3", "train.batch_size=4", "train.warmup_epochs=1"]

    def command(out: Path) -> list[str]:
        sets = [a for o in overrides for a in ("--set", o)]
        return [*CLI, "train", "--dataset", str(dataset), "--text-emb", str(text_emb), "--out", str(out),
                "--resume-from", str(out / "checkpoints"), *sets]

    env = dict(os.environ, PYTHONHASHSEED="0")
    subprocess.run(command(tmp_path / "straight"), cwd=REPO, env=env, check=True, capture_output=True, timeout=900)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta = out / "checkpoints" / "last.json"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(meta.read_text())["epoch"] >= 1:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # somewhere after the first epoch's checkpoint, before the last epoch
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "training finished before it could be killed"
    assert json.loads(meta.read_text())["epoch"] < 3
    resumed = subprocess.run(command(out), cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=900)
    assert "resumed after epoch" in resumed.stdout
    a = load_file(str(tmp_path / "straight" / "checkpoints" / "last.safetensors"))
    b = load_file(str(out / "checkpoints" / "last.safetensors"))
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a), "resumed weights differ"
    assert (tmp_path / "straight" / "history.csv").read_text() == (out / "history.csv").read_text()
    assert (tmp_path / "straight" / "model" / "model.safetensors").read_bytes() == \
        (out / "model" / "model.safetensors").read_bytes()


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).with_name("dvc")
    return subprocess.run([str(dvc), *args], cwd=project, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, DVC_NO_ANALYTICS="1"))


@pytest.mark.slow
def test_a_byte_flipped_in_the_remote_is_caught_when_pulled(tmp_path):
    """The project's own data.dvc and remote settings (verify = true), a copy of its remote, one object
    corrupted: the pull fails and names the folder, and no corrupt clip reaches the workspace. With
    verify off (the contrast) the same pull succeeds and puts the corrupt bytes in place."""
    config = (REPO / ".dvc" / "config").read_text()
    assert "verify = true" in config
    remote = tmp_path / "remote"
    shutil.copytree(REPO / "dvc-remote", remote)
    import yaml

    tree = yaml.safe_load((REPO / "data.dvc").read_text())["outs"][0]["md5"]
    entries = json.loads((remote / "files" / "md5" / tree[:2] / tree[2:]).read_text())
    entry = next(e for e in entries if e["relpath"].endswith(".flac"))  # a clip of the current data.dvc
    victim = remote / "files" / "md5" / entry["md5"][:2] / entry["md5"][2:]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    outcomes = {}
    for verify in ("true", "false"):
        project = tmp_path / f"verify-{verify}"
        project.mkdir()
        assert _dvc(project, "init", "--no-scm", "-q").returncode == 0
        (project / ".dvc" / "config").write_text(config.replace("[core]\n", "[core]\n    no_scm = True\n")
                                                 .replace("../dvc-remote", str(remote))
                                                 .replace("verify = true", f"verify = {verify}"))
        shutil.copyfile(REPO / "data.dvc", project / "data.dvc")
        pulled = _dvc(project, "pull", "data.dvc")
        corrupt = [p for p in (project / "data").rglob("*") if p.is_file() and p.read_bytes() == bytes(raw)]
        outcomes[verify] = (pulled, corrupt)
    pulled, corrupt = outcomes["true"]
    assert pulled.returncode != 0 and "Checkout failed" in pulled.stderr and "data" in pulled.stderr, pulled.stderr
    assert corrupt == []
    pulled, corrupt = outcomes["false"]
    assert pulled.returncode == 0 and len(corrupt) == 1, "without verify the corrupt object would go unnoticed"


HOSTILE_IDS = {"dotdot": "../../evil", "slashes": "a/b/c", "dots_only": "..", "nul_and_controls": "x\x00y\x1b[2J",
               "ten_thousand_chars": "z" * 10_000, "unicode": "chien qui aboie \u2028 犬"}


def test_hostile_clip_ids_get_safe_file_names_inside_the_dataset(tmp_path, params):
    src = tmp_path / "src"
    write_tone(src / "a.wav", 1.0, 16000)
    (src / "manifest.jsonl").write_text("".join(_row(cid, "a.wav") + "\n" for cid in HOSTILE_IDS.values()))
    result = ingest(src, tmp_path / "out", _config(params))
    assert sorted(c.clip_id for c in result.clips) == sorted(HOSTILE_IDS.values()) and not result.quarantined
    files = {c.audio_path for c in result.clips}
    assert len(files) == len(HOSTILE_IDS)
    for rel in files:
        path = (tmp_path / "out" / rel).resolve()
        assert path.parent == (tmp_path / "out" / "audio").resolve() and len(path.name.encode()) <= 255, rel
    assert sorted(p.name for p in (tmp_path / "out" / "audio").iterdir()) == sorted(f.split("/")[1] for f in files)
