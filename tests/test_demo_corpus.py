"""The demo corpus: restored by a real `dvc pull` from the in-repo remote, and what the README says it is."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import soundfile as sf

from cacara.manifest import read_manifest
from tests.conftest import REPO

DVC = str(Path(sys.executable).with_name("dvc"))


def test_fresh_clone_restores_the_corpus_with_dvc_pull(tmp_path):
    """A clean clone has no data/; `dvc pull` brings it back, byte-identical, with no network."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # The clone holds what is committed: make the working tree's DVC files the ones under test.
    for name in ("data.dvc", ".dvc/config"):
        shutil.copyfile(REPO / name, clone / name)
    shutil.rmtree(clone / "dvc-remote", ignore_errors=True)
    shutil.copytree(REPO / "dvc-remote", clone / "dvc-remote")
    env = dict(os.environ, DVC_NO_ANALYTICS="1")
    proc = subprocess.run([DVC, "pull", "-q", "data.dvc"], cwd=clone, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (clone / "data" / "manifest.jsonl").read_bytes() == (REPO / "data" / "manifest.jsonl").read_bytes()
    status = subprocess.run([DVC, "status", "data.dvc"], cwd=clone, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout


def test_demo_corpus_contents():
    clips = read_manifest(REPO / "data")
    assert len(clips) == 94
    langs = Counter(lang for c in clips for lang in c.captions)
    assert sum(1 for n in langs.values() if n == len(clips)) >= 57
    assert all(c.license == "GPL-2.0-or-later" and c.captions["en"] for c in clips)
    for clip in clips[:10]:
        info = sf.info(str(REPO / "data" / clip.audio_path))
        assert (info.samplerate, info.channels) == (16000, 1)
    assert (REPO / "data" / "LICENSE").exists() and (REPO / "data" / "COPYRIGHT.debian").exists()
