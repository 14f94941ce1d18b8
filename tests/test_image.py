"""The images: the Dockerfiles pass hadolint (always); building the CPU image and running the first two
pipeline steps inside it happens only when asked, since it takes minutes and gigabytes:

    CACARA_IMAGE_TEST=1 .venv/bin/python -m pytest tests/test_image.py

That path needs buildah and debootstrap (scripts/build_image.sh installs them as root) and reaches only
Debian's mirror and PyPI; `buildah run --isolation chroot` runs the commands (this sandbox refuses
`podman run`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = ("Dockerfile", "Dockerfile.cuda")
BUILD = os.environ.get("CACARA_IMAGE_TEST") == "1"


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile):
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = subprocess.run([str(hadolint), "--no-color", str(REPO / dockerfile)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_the_pinned_environment_as_a_non_root_user():
    text = (REPO / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c requirements.lock ." in text
    assert re.search(r"^USER \$\{UID\}$", text, re.M) and "ARG UID=10001" in text
    assert "ensure_weights()" in text  # weights converted at build time
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    assert "FROM ${CPU_IMAGE}" in (REPO / "Dockerfile.cuda").read_text()


def _version() -> str:
    return re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


@pytest.mark.skipif(not BUILD, reason="builds a 7 GB image: set CACARA_IMAGE_TEST=1")
def test_image_builds_and_runs_ingest_and_validate(tmp_path):
    build = subprocess.run(["make", "image"], cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    image = f"localhost/cacara:{_version()}"
    info = json.loads(subprocess.run(["buildah", "inspect", "--type", "image", image], capture_output=True,
                                     text=True, check=True).stdout)
    assert info["OCIv1"]["config"]["User"] == "10001"
    container = subprocess.run(["buildah", "from", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        def run(*cmd: str) -> subprocess.CompletedProcess:
            return subprocess.run(["buildah", "run", "--isolation", "chroot", container, "--", *cmd],
                                  capture_output=True, text=True, timeout=900)

        ingest = run("cacara", "ingest", "--source", "/opt/cacara/data", "--out", "/tmp/dataset")
        assert ingest.returncode == 0, ingest.stderr[-3000:]
        assert "94 clips kept, 0 quarantined" in ingest.stdout
        validate = run("cacara", "validate", "--dataset", "/tmp/dataset", "--reports", "/tmp/reports")
        assert validate.returncode == 0, validate.stderr[-3000:]
        assert "validate: PASSED" in validate.stdout
        whoami = run("id", "-u")
        assert whoami.stdout.strip() == "10001"
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def test_build_script_refuses_to_run_without_the_demo_corpus(tmp_path):
    """The image carries the demo corpus; the build says what to run when it is missing."""
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed here")
    work = tmp_path / "repo"
    (work / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "build_image.sh", work / "scripts")
    shutil.copy(REPO / "pyproject.toml", work)
    proc = subprocess.run(["bash", str(work / "scripts" / "build_image.sh"), "cpu"], capture_output=True, text=True)
    assert proc.returncode != 0 and "make data" in proc.stderr
