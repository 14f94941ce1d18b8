"""The closing summary of ``make run``: what each stage that has run produced, read from its reports."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from cacara.manifest import MANIFEST_NAME, QUARANTINE_NAME, SPLITS, read_manifest


def _load(path: Path) -> Any | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def dataset_lines(dataset: Path) -> list[str]:
    if not (dataset / MANIFEST_NAME).exists():
        return [f"dataset: not built yet ({dataset})"]
    clips = read_manifest(dataset)
    splits = Counter(c.split for c in clips)
    langs = Counter(lang for c in clips for lang in c.captions)
    full = sum(1 for n in langs.values() if n == len(clips))
    q = _load(dataset / QUARANTINE_NAME) or {}
    reasons = Counter(item["reason"] for item in q.get("quarantined", []))
    lines = [f"dataset: {len(clips)} clips, {sum(c.duration_s for c in clips):.0f} s of audio, "
             f"{len(langs)} caption languages ({full} cover every clip)",
             "  splits: " + ", ".join(f"{s} {splits.get(s, 0)}" for s in SPLITS),
             f"  quarantined: {sum(reasons.values())}" + (f" ({dict(reasons)})" if reasons else "")]
    return lines


def validation_lines(report: Path) -> list[str]:
    data = _load(report)
    if data is None:
        return [f"validation: no report yet ({report})"]
    exps = data.get("expectations", [])
    failed = [e for e in exps if not e.get("success")]
    lines = [f"validation: {'PASSED' if data.get('success') else 'FAILED'}, "
             f"{len(exps) - len(failed)}/{len(exps)} expectations met"]
    for e in failed:
        lines.append(f"  {e.get('severity', '?')}: {e.get('name')} -> {', '.join(map(str, e.get('offending_ids', [])[:10]))}")
    return lines


def print_summary(root: Path, params: dict[str, Any]) -> None:
    work = root / params["data"]["work_dir"]
    lines = ["", "=== CACARA run summary ==="]
    lines += dataset_lines(work / "dataset")
    lines += validation_lines(root / "reports" / "validation" / "validation.json")
    print("\n".join(lines))
