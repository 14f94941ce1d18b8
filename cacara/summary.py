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


def training_lines(work: Path) -> list[str]:
    lines = []
    for name, folder in (("train", "train"), ("train (English-only tower)", "train_en")):
        config = _load(work / folder / "model" / "config.json")
        if config is None:
            if folder == "train":
                lines.append(f"{name}: no model yet")
            continue
        val = config.get("val", {})
        lines.append(f"{name}: {config['text_encoder']}, selected epoch {config.get('epoch')} "
                     f"(val en t2a R@1 {val.get('t2a_R@1', float('nan')):.1f}, a2t R@1 {val.get('a2t_R@1', float('nan')):.1f})")
    return lines


def evaluation_lines(report_dir: Path, params: dict[str, Any]) -> list[str]:
    metrics = _load(report_dir / "metrics.json")
    table = report_dir / "table.txt"
    if metrics is None or not table.exists():
        return [f"evaluation: no report yet ({report_dir})"]
    lang = params["ingest"]["training_language"]
    lines = [table.read_text(encoding="utf-8").rstrip(), "",
             f"{'system':<22}{'en t2a R@1/R@5/R@10 mAP@10':>32}{'en a2t R@1/R@5/R@10':>24}{'other langs t2a R@1':>22}"]
    for system, m in metrics.items():
        if system == "checks" or not m.get(lang):
            continue
        e, o = m[lang], m.get("mean_other_languages") or {}
        lines.append(f"{system:<22}{e['t2a_R@1']:>10.1f}{e['t2a_R@5']:>6.1f}{e['t2a_R@10']:>6.1f}{e['t2a_mAP@10']:>10.1f}"
                     f"{e['a2t_R@1']:>12.1f}{e['a2t_R@5']:>6.1f}{e['a2t_R@10']:>6.1f}{o.get('t2a_R@1', float('nan')):>22.1f}")
    c = metrics.get("checks", {})
    if c:
        lines.append(f"checks (t2a R@1, languages with >= {params['evaluate']['min_captions']} test captions):")
        lines.append(f"  trained beats untrained on English: {c.get('trained_beats_untrained_en_t2a_R@1')}")
        if "english_only_contrast" not in c:
            lines.append("  (no English-only contrast run: evaluate.english_only_contrast is off)")
            lines.append(f"plot: {report_dir / 'r1_per_language.png'}")
            return lines
        lines.append(f"  multilingual beats the English-only tower in {c.get('known_languages_where_multilingual_beats_english_only_t2a_R@1')}"
                     f"/{c.get('other_languages_known_to_tower')} other languages the tower knows"
                     f" (not beaten: {', '.join(c.get('known_languages_where_english_only_is_not_beaten', [])) or 'none'})")
        if "bootstrap_confidence" in c:
            above = c.get("known_languages_significantly_above_english_only", [])
            below = c.get("known_languages_significantly_below_english_only", [])
            lines.append(f"  paired bootstrap over test clips ({c['bootstrap_confidence']:.0%} interval): "
                         f"significantly above the English-only tower in {len(above)}, below in {len(below)}"
                         f"{' (' + ', '.join(below) + ')' if below else ''}")
        unknown = c.get("languages_unknown_to_tower", [])
        if unknown:
            lines.append(f"  and in {c.get('unknown_languages_where_multilingual_beats_english_only_t2a_R@1')}/{len(unknown)}"
                         f" languages it does not claim ({', '.join(unknown)})")
    lines.append(f"plot: {report_dir / 'r1_per_language.png'}")
    return lines


def drift_lines(report_dir: Path) -> list[str]:
    summary = _load(report_dir / "drift.json")
    if summary is None:
        return [f"drift: no report yet ({report_dir})"]
    verdict = "PASSED" if summary["passed"] else f"DRIFTED ({', '.join(summary['drifted'])})"
    emb = summary["embeddings"]
    return [f"drift: {verdict}: {summary['current']['clips']} held-out clips against the {summary['reference']['clips']} "
            f"training clips of the reference, {len(summary['columns'])} columns at p < "
            f"{summary['per_column_threshold']:.2g} each, embeddings {emb['method']} {float(emb['score']):.3g} "
            f"(drift above {emb['threshold']})",
            f"  report: {report_dir / 'drift_report.html'}"]


def print_summary(root: Path, params: dict[str, Any]) -> None:
    work = root / params["data"]["work_dir"]
    lines = ["", "=== CACARA run summary ==="]
    lines += dataset_lines(work / "dataset")
    lines += validation_lines(root / "reports" / "validation" / "validation.json")
    lines += training_lines(work)
    lines += drift_lines(root / "reports" / "drift")
    lines += [""] + evaluation_lines(root / "reports" / "evaluate", params)
    print("\n".join(lines))
