"""Where converted weights live on disk, and how a cached file proves it is the one we wrote.

Converted weights are derived data: they can always be rebuilt from an installed package, so they sit
in a per-user cache rather than in the repository. A JSON sidecar records the file's SHA-256 and its
source, which lets a loader tell a stale cache (the source package changed: rebuild) from a corrupt or
tampered one (the bytes changed: refuse).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variable that moves the cache (CI runners, shared volumes in a cluster).
WEIGHTS_DIR_ENV = "CACARA_WEIGHTS_DIR"
#: Used when neither an explicit directory nor the environment variable is given.
DEFAULT_WEIGHTS_DIR = Path("~/.cache/cacara/weights")
#: Read size for hashing: large enough to be fast, small enough not to matter for memory.
HASH_CHUNK_BYTES = 1 << 20


class WeightsIntegrityError(RuntimeError):
    """A cached weights file no longer matches the checksum recorded when it was written."""


def resolve_weights_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The explicit argument wins, then ``$CACARA_WEIGHTS_DIR``, then ``~/.cache/cacara/weights``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return DEFAULT_WEIGHTS_DIR.expanduser()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, streamed so large checkpoints do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: The single safetensors metadata key our files carry (see :func:`safetensors_metadata`).
METADATA_KEY = "cacara"


def safetensors_metadata(fields: dict[str, Any]) -> dict[str, str]:
    """``fields`` as safetensors metadata that serialises to the same bytes every time.

    safetensors writes its metadata map in random order (safetensors/safetensors#584), so a file
    with two metadata keys differs from run to run: its sha256 changes and DVC sees a new model
    though every tensor is equal. One key holding sorted JSON has only one order.
    """
    return {METADATA_KEY: json.dumps(fields, sort_keys=True)}


def sidecar_path(weights_path: Path) -> Path:
    """``yamnet.safetensors`` -> ``yamnet.safetensors.json``: the pair stays together when copied."""
    return weights_path.with_name(weights_path.name + ".json")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so parallel workers never read a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_sidecar(weights_path: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Record the weights file's checksum plus caller-supplied provenance next to it."""
    record = dict(info)
    record["file"] = weights_path.name
    record["sha256"] = sha256_file(weights_path)
    atomic_write_bytes(sidecar_path(weights_path), (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    return record


def read_sidecar(weights_path: Path) -> dict[str, Any] | None:
    """The recorded provenance, or None when the cache has not been written (or was half-cleaned)."""
    side = sidecar_path(weights_path)
    if not side.exists() or not weights_path.exists():
        return None
    with side.open(encoding="utf-8") as fh:
        return json.load(fh)


def verify_checksum(weights_path: Path, record: dict[str, Any]) -> None:
    """Refuse a file whose bytes changed after it was written: silently loading it would hide the cause."""
    actual = sha256_file(weights_path)
    expected = record.get("sha256")
    if actual != expected:
        raise WeightsIntegrityError(
            f"{weights_path}: sha256 {actual} does not match the recorded {expected}; "
            f"delete the file and its sidecar to rebuild it"
        )
