"""Shared test setup: offline, no telemetry, and real audio files generated on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parent.parent


def write_tone(path: Path, seconds: float = 1.0, sr: int = 16000, channels: int = 1,
               freq: float = 440.0, amplitude: float = 0.3, seed: int = 0) -> Path:
    """A real audio file: a tone plus a little noise, so RMS and spectra are not degenerate."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    mono = amplitude * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)
    data = np.stack([mono * (1 - 0.2 * c) for c in range(channels)], axis=1) if channels > 1 else mono
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data.astype(np.float32), sr)
    return path


@pytest.fixture
def params():
    from cacara.params import load_params

    return load_params()


DEMO = REPO / "data"


def demo_subset(dest: Path, per_split: dict[str, int], languages: tuple[str, ...] = ("en", "fr", "de", "es")) -> Path:
    """A small canonical dataset cut from the real demo corpus (restored by `dvc pull`).

    Splits are reassigned so a handful of clips gives train, val and test; captions are limited to a
    few languages to keep text embedding quick.
    """
    import json
    import shutil

    from cacara.manifest import read_manifest, write_manifest

    if not (DEMO / "manifest.jsonl").exists():
        raise RuntimeError("the demo corpus is missing: run `make test` (it runs `dvc pull`) first")
    clips = read_manifest(DEMO)
    chosen = []
    i = 0
    for split, n in per_split.items():
        for clip in clips[i:i + n]:
            clip.split = split
            clip.captions = {k: v for k, v in clip.captions.items() if k in languages}
            chosen.append(clip)
        i += n
    (dest / "audio").mkdir(parents=True, exist_ok=True)
    for clip in chosen:
        shutil.copyfile(DEMO / clip.audio_path, dest / clip.audio_path)
    write_manifest(chosen, dest)
    return dest


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(dataset, text embedding cache, params) for quick train/evaluate tests on real clips.

    use-multilingual is the text tower here because it loads in well under a second.
    """
    from cacara.config import EmbedTextConfig
    from cacara.params import load_params
    from components.embed_text import embed_text

    root = tmp_path_factory.mktemp("tiny")
    dataset = demo_subset(root / "dataset", {"train": 8, "val": 4, "test": 4})
    params = load_params(overrides={"model.text_encoder": "use-multilingual", "train.epochs": 3,
                                    "train.batch_size": 4, "train.warmup_epochs": 1,
                                    "evaluate.english_only_text_encoder": "minilm-en",
                                    "evaluate.chance_draws": 2, "evaluate.min_captions": 1})
    embed_text(dataset, root / "text_emb", EmbedTextConfig.from_params(params))
    return dataset, root / "text_emb", params


def use_bentoml_home(path: Path) -> None:
    """Point BentoML's model and Bento stores at ``path`` for this process and its children: the tests
    never touch the user's store (work/bentoml under make)."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    for sub in ("", "tmp", "models", "bentos"):  # what bentoml creates when it starts on a new home
        (path / sub).mkdir(parents=True, exist_ok=True)
    os.environ["BENTOML_HOME"] = str(path)
    BentoMLContainer.bentoml_home.set(str(path))
    for provider in (BentoMLContainer.model_store, BentoMLContainer.bento_store, BentoMLContainer.tmp_bento_store):
        provider.reset()


@pytest.fixture(scope="session")
def packaged(tmp_path_factory):
    """The demo corpus as it is, the model ``dvc repro`` trains on it, an index of every clip, packaged
    into a BentoML store of its own. The English-only contrast tower is not needed here, so the
    multilingual tower's own USE part stands in for it (embed_text always embeds one).
    Returns a namespace: home, model_tag, bento_tag, dataset, model_dir, index_dir, package_dir."""
    import json
    import shutil
    from types import SimpleNamespace

    from cacara.config import DriftProfileConfig, EmbedTextConfig, IndexConfig, PackageConfig, TrainConfig
    from cacara.manifest import read_manifest, write_manifest
    from cacara.params import load_params
    from components.embed_text import embed_text
    from components.drift import profile_reference
    from components.index import build_index
    from components.package import package
    from components.train import train

    root = tmp_path_factory.mktemp("serving")
    if not (DEMO / "manifest.jsonl").exists():
        raise RuntimeError("the demo corpus is missing: run `make test` (it runs `dvc pull`) first")
    clips = read_manifest(DEMO)
    dataset = root / "dataset"
    (dataset / "audio").mkdir(parents=True)
    for clip in clips:
        shutil.copyfile(DEMO / clip.audio_path, dataset / clip.audio_path)
    write_manifest(clips, dataset)
    params = load_params(overrides={"evaluate.english_only_text_encoder": "use-multilingual"})
    embed_text(dataset, root / "text_emb", EmbedTextConfig.from_params(params))
    train(dataset, root / "text_emb", root / "train", TrainConfig.from_params(params))
    build_index(dataset, root / "train" / "model", root / "index", IndexConfig.from_params(params))
    profile_reference(dataset, root / "train" / "model", root / "drift_reference",
                      DriftProfileConfig.from_params(params))
    use_bentoml_home(root / "bentoml")
    result = package(root / "train" / "model", root / "index", root / "package", PackageConfig.from_params(params),
                     data_md5="0" * 32, drift_reference=root / "drift_reference")
    assert json.loads((root / "package" / "package.json").read_text())["model_tag"] == result.model_tag
    return SimpleNamespace(home=root / "bentoml", model_tag=result.model_tag, bento_tag=result.bento_tag,
                           dataset=dataset, model_dir=root / "train" / "model", index_dir=root / "index",
                           package_dir=root / "package", params=params, clips=clips,
                           drift_reference=root / "drift_reference")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(packaged, tmp_path_factory):
    """The packaged Bento served by ``cacara serve`` (``bentoml serve``) on a free loopback port, logging
    audio requests for drift checks into ``drift_log``; stopped by its PID (the whole process group:
    bentoml starts worker processes)."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from types import SimpleNamespace

    port = free_port()
    folder = tmp_path_factory.mktemp("served")
    log, drift_log = folder / "serve.log", folder / "drift_log"
    env = {**os.environ, "BENTOML_HOME": str(packaged.home), "CACARA_DRIFT_LOG_DIR": str(drift_log)}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cacara.cli", "serve", "--package", str(packaged.package_dir),
                                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready after 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield SimpleNamespace(url=url, port=port, pid=proc.pid, log=log, drift_log=drift_log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
