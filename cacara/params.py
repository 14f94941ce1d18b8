"""Loading ``params.yaml``: one place so the CLI, dvc stages, kfp components and tests read the same knobs."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


#: Names the params file explicitly (the images set it: their code is installed, not checked out).
PARAMS_ENV = "CACARA_PARAMS"


def default_params_file() -> Path:
    """``$CACARA_PARAMS``, else ``params.yaml`` of the current directory (where dvc runs a stage: the
    user's project), else the one beside the code."""
    if os.environ.get(PARAMS_ENV):
        return Path(os.environ[PARAMS_ENV])
    local = Path.cwd() / "params.yaml"
    return local if local.exists() else DEFAULT_PARAMS


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read params.yaml and apply dotted overrides (``{"split.seed": 3}``).

    Overrides exist because kfp pipeline parameters and tests change single knobs without
    writing a new file; the dotted form mirrors ``dvc exp run -S``.
    """
    p = Path(path) if path else default_params_file()
    if not p.exists():
        raise FileNotFoundError(f"params file not found: {p}")
    with p.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    params = copy.deepcopy(params)
    for key, value in (overrides or {}).items():
        node: Any = params
        *parents, leaf = key.split(".")
        for depth, part in enumerate(parents + [leaf]):
            where = ".".join(parents[:depth]) or "params.yaml"
            if not isinstance(node, dict):
                _refuse(f"unknown parameter {key!r}: {where} is a value, not a section")
            if part not in node:
                # A new key would be refused by the typed configs anyway; say here what the section holds.
                _refuse(f"unknown parameter {key!r}; {where} has {', '.join(sorted(map(str, node))) or 'nothing'}")
            if depth < len(parents):
                node = node[part]
        node[leaf] = value
    return params


def _refuse(message: str) -> None:
    from cacara.config import ConfigError  # config imports nothing from here; this keeps it that way

    raise ConfigError(message)
