"""Loading ``params.yaml``: one place so the CLI, dvc stages, kfp components and tests read the same knobs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PARAMS = REPO_ROOT / "params.yaml"


def load_params(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read params.yaml and apply dotted overrides (``{"split.seed": 3}``).

    Overrides exist because kfp pipeline parameters and tests change single knobs without
    writing a new file; the dotted form mirrors ``dvc exp run -S``.
    """
    p = Path(path) if path else DEFAULT_PARAMS
    if not p.exists():
        raise FileNotFoundError(f"params file not found: {p}")
    with p.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    params = copy.deepcopy(params)
    for key, value in (overrides or {}).items():
        node = params
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {}) if isinstance(node, dict) else node
        if not isinstance(node, dict) or (leaf not in node and parents):
            from cacara.config import ConfigError

            known = ", ".join(sorted(node)) if isinstance(node, dict) else "nothing (not a section)"
            raise ConfigError(f"unknown parameter {key!r}; {'.'.join(parents) or 'params.yaml'} has {known}")
        node[leaf] = value
    return params
