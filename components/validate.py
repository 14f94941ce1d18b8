"""Step 2, validate: Great Expectations checks on the canonical dataset before anything trains on it.

Why a separate step after ingest: ingest repairs and quarantines row by row, but it cannot see what
only the whole dataset shows (duplicate ids, a skewed split) and it trusts files it wrote earlier.
Here every file is decoded again and every check is a real GX expectation, so the verdict comes with
GX Data Docs a reviewer can open, plus a JSON report a pipeline can read.

Each GX expectation carries ``meta.check``, one of the logical check names in ``params.yaml``
(``validate.critical`` / ``validate.warning``); several expectations may serve one check (``schema``
is a column-set, a row count, a not-null and a type expectation per field). A failed critical check
raises :class:`ValidationFailed` after the reports are written; a failed warning is logged and
recorded only. A check listed in neither group is not run, which is how a deployment switches one off.

Four tables are validated:

* ``manifest``: the raw JSONL rows (parsed leniently, so a broken row is reported with its line
  number instead of stopping the read at the first one);
* ``audio``: what each file really holds (:mod:`components.audio_stats`);
* ``captions``: one row per caption (clip_id, split, language, caption);
* ``splits``: each split's share of the rows next to its configured fraction.

Language rule (``training_language``): lingua is unreliable on captions of one to three words
("A cow." scores Polish 0.22, English 0.07; "A dog barks" comes out Danish). A training-language
caption of a training clip with at least ``validate.language_min_words`` words must be detected as
that language; a shorter one fails only when some other language reaches
``validate.language_max_other_confidence``, i.e. only a confident contradiction counts. The detector
(all languages, models preloaded: about 10 s and 1.2 GB once per process) is built on first use and
cached for the life of the process, and only when there is a caption to check.

Nothing here imports kfp: the module runs inside kfp components, which see only kfp runtime types.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import pandas as pd

from cacara.config import CHECKS, ValidateConfig
from cacara.manifest import MANIFEST_NAME, SCHEMA, SPLITS, Clip
from components.audio_stats import STATUS_OK, audio_stats_table

if TYPE_CHECKING:
    from lingua import LanguageDetector

log = logging.getLogger(__name__)

CRITICAL = "critical"
WARNING = "warning"

JSON_NAME = "validation.json"
HTML_NAME = "validation.html"
DATA_DOCS_DIR = "data_docs"
DATA_DOCS_SITE = "local_site"  # the site an ephemeral GX context already declares (in a temp dir)
SUITE_PREFIX = "cacara_"

LINE_COLUMN = "manifest_line"  # added to the raw manifest table so rows without a usable clip_id have a name
EXTRA_COLUMN = "extra"  # Clip's optional free-form dict
TABLE_KEYS: dict[str, list[str]] = {  # columns GX reports for every unexpected row of each table
    "manifest": ["clip_id", LINE_COLUMN],
    "audio": ["clip_id", "audio_path"],
    "captions": ["clip_id", "language", "caption", "detected_language"],
    "splits": ["split", "share", "expected"],
}
SPLIT_KEY_TABLES = {"splits"}  # tables whose rows are splits, not clips

MESSAGE_MAX_IDS = 20  # a ValidationFailed message stays readable in a kfp log
REPORT_MAX_ROWS = 1000  # per expectation in validation.json; Data Docs and the GX result keep the rest
SHARE_DECIMALS = 9  # split shares are rounded so 0.25 - 0.10 is not 0.15000000000000002
TRAIN_SPLIT = SPLITS[0]  # "train": the only split whose captions the model learns from


class ValidationFailed(ValueError):
    """A critical expectation failed; ``validation.json`` and the Data Docs are written before this is raised."""

    def __init__(self, message: str, result: "ValidationResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass
class ExpectationOutcome:
    """One logical check (a name from params.yaml) folded over the GX expectations that serve it."""

    name: str
    severity: str
    success: bool
    offending_ids: list[str] = field(default_factory=list)  # clip ids; split names for the split shares
    offending_rows: list[dict[str, Any]] = field(default_factory=list)  # GX unexpected_index_list entries
    observed: list[dict[str, Any]] = field(default_factory=list)  # per GX expectation: kwargs, counts, values

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "severity": self.severity, "success": self.success,
                "n_offending": len(self.offending_ids), "offending_ids": self.offending_ids[:REPORT_MAX_ROWS],
                "offending_rows": self.offending_rows[:REPORT_MAX_ROWS], "expectations": self.observed}


@dataclass
class ValidationResult:
    """The verdict: ``success`` is False exactly when a critical check failed."""

    success: bool
    expectations: list[ExpectationOutcome]
    json_path: Path
    html_path: Path
    data_docs_index: Path
    n_clips: int = 0
    n_captions: int = 0

    def failed(self, severity: str | None = None) -> list[ExpectationOutcome]:
        return [e for e in self.expectations if not e.success and severity in (None, e.severity)]

    def summary(self) -> str:
        """What the CLI prints: the verdict, then every failed check with the first offending ids."""
        lines = [f"validate: {'PASSED' if self.success else 'FAILED'} - {self.n_clips} clips, "
                 f"{self.n_captions} captions, {len(self.expectations) - len(self.failed())}/"
                 f"{len(self.expectations)} checks met; report {self.html_path}"]
        for e in self.failed():
            lines.append(f"  {e.severity}: {e.name} ({len(e.offending_ids)}): {', '.join(e.offending_ids[:10])}")
        return "\n".join(lines)

    def get(self, name: str) -> ExpectationOutcome:
        for e in self.expectations:
            if e.name == name:
                return e
        raise KeyError(f"no check named {name!r} was run")


# ---------------------------------------------------------------------------------------------- tables

def _read_manifest_rows(dataset_dir: Path) -> tuple[pd.DataFrame, list[Clip]]:
    """The raw rows as a table, plus the rows that make a Clip.

    ``cacara.manifest.read_manifest`` stops at the first bad row, which is right for training but
    would make this report name one problem at a time; here every row is kept and judged.
    """
    path = dataset_dir / MANIFEST_NAME if dataset_dir.is_dir() else dataset_dir
    records: list[dict[str, Any]] = []
    clips: list[Clip] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                log.warning("%s:%d: not JSON (%s)", path, lineno, exc)
                row = None
            if not isinstance(row, dict):
                records.append({LINE_COLUMN: lineno})
                continue
            records.append({**row, LINE_COLUMN: lineno})
            try:
                clips.append(Clip.from_json(row))
            except (ValueError, TypeError) as exc:
                log.warning("%s:%d: not a canonical row (%s)", path, lineno, exc)
    expected = [*SCHEMA, EXTRA_COLUMN, LINE_COLUMN]
    columns = expected + sorted({k for r in records for k in r} - set(expected))
    # Object dtype: a missing field must not turn an int column into floats and fail the type check too.
    return pd.DataFrame(records, columns=columns, dtype=object), clips


def _caption_rows(clips: Iterable[Clip]) -> pd.DataFrame:
    """One row per caption; a clip without any caption gets one row with a null caption so it shows up."""
    rows: list[dict[str, Any]] = []
    for clip in clips:
        caps = clip.captions if isinstance(clip.captions, dict) else {}
        before = len(rows)
        for lang in sorted(caps, key=str):
            texts = caps[lang]
            texts = [texts] if isinstance(texts, str) else texts if isinstance(texts, list) else [None]
            for text in texts:
                rows.append({"clip_id": str(clip.clip_id), "split": clip.split, "language": str(lang),
                             "caption": text if isinstance(text, str) else None})
        if len(rows) == before:
            rows.append({"clip_id": str(clip.clip_id), "split": clip.split, "language": None, "caption": None})
    return pd.DataFrame(rows, columns=["clip_id", "split", "language", "caption"], dtype=object)


def _split_rows(manifest: pd.DataFrame, config: ValidateConfig) -> pd.DataFrame:
    """Each split's share of all rows (unknown split values count in the denominator) vs. its fraction."""
    fractions = config.split.fractions()
    total_fraction = sum(fractions.values())
    counts = Counter(manifest["split"].tolist()) if "split" in manifest else Counter()
    n = len(manifest)
    rows = []
    for s in SPLITS:
        share = counts.get(s, 0) / n if n else 0.0
        expected = fractions[s] / total_fraction if total_fraction > 0 else 0.0
        rows.append({"split": s, "n_clips": counts.get(s, 0), "share": round(share, SHARE_DECIMALS),
                     "expected": round(expected, SHARE_DECIMALS),
                     "deviation": round(abs(share - expected), SHARE_DECIMALS)})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------- language

@lru_cache(maxsize=1)
def language_detector() -> "LanguageDetector":
    """All languages, preloaded: a restricted set would call any text English when English is the
    closest candidate, and lazy loading only moves the same load into the first caption."""
    from lingua import LanguageDetectorBuilder

    log.info("loading lingua language models (once per process)")
    return LanguageDetectorBuilder.from_all_languages().with_preloaded_language_models().build()


def judge_caption_languages(texts: list[str], language_code: str,
                            config: ValidateConfig) -> list[tuple[bool, str | None]]:
    """Apply the language rule of the module docstring to each caption: (passes, detected ISO 639-1 code).

    Batched because lingua's ``*_in_parallel`` calls spread a large caption table over every core.
    """
    from lingua import IsoCode639_1, Language

    if not texts:
        return []
    language = Language.from_iso_code_639_1(IsoCode639_1.from_str(language_code))
    min_words = config.validate_.language_min_words
    max_other = config.validate_.language_max_other_confidence
    detector = language_detector()

    def code(lang: Any) -> str | None:
        return lang.iso_code_639_1.name.lower() if lang is not None else None

    out: list[tuple[bool, str | None]] = [(False, None)] * len(texts)
    long_idx = [i for i, t in enumerate(texts) if len(t.split()) >= min_words]
    short_idx = [i for i, t in enumerate(texts) if len(t.split()) < min_words]
    for i, detected in zip(long_idx, detector.detect_languages_in_parallel_of([texts[i] for i in long_idx])):
        out[i] = (detected == language, code(detected))
    confidences = detector.compute_language_confidence_values_in_parallel([texts[i] for i in short_idx])
    for i, values in zip(short_idx, confidences):
        contradicted = any(v.language != language and v.value >= max_other for v in values)
        out[i] = (not contradicted, code(values[0].language) if values else None)
    return out


def _add_language_flags(captions: pd.DataFrame, config: ValidateConfig, run: bool) -> pd.DataFrame:
    """``language_ok``: True/False for training-language captions of training clips, null elsewhere
    (null rows are outside the expectation's domain, so evaluation captions in other languages pass);
    ``detected_language`` rides along so a failure in the report says what lingua heard instead."""
    captions = captions.copy()
    for col in ("language_ok", "detected_language"):
        captions[col] = pd.Series([None] * len(captions), index=captions.index, dtype=object)
    if not run or captions.empty:
        return captions
    code = config.training_language
    text = captions["caption"]
    mask = ((captions["split"] == TRAIN_SPLIT) & (captions["language"] == code)
            & text.map(lambda t: isinstance(t, str) and bool(t.strip())))
    if mask.any():
        verdicts = judge_caption_languages(text[mask].tolist(), code, config)
        idx = text[mask].index
        captions.loc[mask, "language_ok"] = pd.Series([ok for ok, _ in verdicts], index=idx, dtype=object)
        captions.loc[mask, "detected_language"] = pd.Series([lang for _, lang in verdicts], index=idx, dtype=object)
    return captions


# ------------------------------------------------------------------------------------------ expectations

def _severities(config: ValidateConfig) -> dict[str, str]:
    """Check name -> severity (the config has already refused unknown names and names listed twice)."""
    out = {name: CRITICAL for name in config.validate_.critical}
    out.update({name: WARNING for name in config.validate_.warning})
    for name in CHECKS:
        if name not in out:
            log.info("check %s is in neither validate.critical nor validate.warning: not run", name)
    return out


def _type_names(types: type | tuple[type, ...]) -> list[str]:
    return [t.__name__ for t in (types if isinstance(types, tuple) else (types,))]


def _expectations(config: ValidateConfig) -> dict[str, list[tuple[str, Any]]]:
    """(check name, GX expectation) per table; every threshold comes from the config."""
    import great_expectations as gx

    E = gx.expectations
    v, a = config.validate_, config.audio
    sr = a.sample_rate
    manifest: list[tuple[str, Any]] = [
        ("schema", E.ExpectTableColumnsToMatchSet(column_set=[*SCHEMA, EXTRA_COLUMN, LINE_COLUMN], exact_match=True)),
        ("schema", E.ExpectTableRowCountToBeBetween(min_value=1)),
    ]
    for name, (types, required) in SCHEMA.items():
        if required:
            manifest.append(("schema", E.ExpectColumnValuesToNotBeNull(column=name)))
        manifest.append(("schema", E.ExpectColumnValuesToBeInTypeList(column=name, type_list=_type_names(types))))
    manifest += [
        ("schema", E.ExpectColumnValuesToBeInTypeList(column=EXTRA_COLUMN, type_list=["dict"])),
        ("unique_ids", E.ExpectColumnValuesToBeUnique(column="clip_id")),
        ("sample_rate", E.ExpectColumnValuesToBeInSet(column="sample_rate", value_set=[sr])),
        ("split_fractions", E.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS))),
    ]
    audio = [
        ("audio_decodable", E.ExpectColumnValuesToBeInSet(column="audio_status", value_set=[STATUS_OK])),
        ("sample_rate", E.ExpectColumnValuesToBeInSet(column="file_sample_rate", value_set=[sr])),
        ("duration", E.ExpectColumnValuesToBeBetween(column="duration_s", min_value=a.min_duration_s,
                                                      max_value=a.max_duration_s)),
        ("rms_level", E.ExpectColumnValuesToBeBetween(column="rms_dbfs", min_value=v.min_rms_dbfs)),
        ("clipping", E.ExpectColumnValuesToBeBetween(column="clipping_ratio",
                                                      max_value=v.max_clipping_ratio)),
    ]
    captions = [
        ("captions_present", E.ExpectColumnValuesToNotBeNull(column="caption")),
        ("captions_present", E.ExpectColumnValuesToNotMatchRegex(column="caption", regex=r"^\s*$")),
        ("caption_length", E.ExpectColumnValueLengthsToBeBetween(column="caption",
                                                                 min_value=v.caption_min_chars,
                                                                 max_value=v.caption_max_chars)),
        ("training_language", E.ExpectColumnValuesToBeInSet(column="language_ok", value_set=[True])),
    ]
    splits = [
        ("split_fractions", E.ExpectColumnValuesToBeBetween(column="deviation", min_value=0.0,
                                                             max_value=v.split_tolerance)),
    ]
    return {"manifest": manifest, "audio": audio, "captions": captions, "splits": splits}


def _run_suites(tables: dict[str, pd.DataFrame], config: ValidateConfig, severities: dict[str, str],
                data_docs_dir: Path) -> tuple[list[Any], Path]:
    """One suite and ValidationDefinition per table, each run with its own key columns, then Data Docs.

    ``ValidationDefinition.run`` (rather than one Checkpoint) because a Checkpoint applies one
    result_format, hence one set of ``unexpected_index_column_names``, to every table, and the split
    table has no clip_id. Each run lands in the context's results store, so ``build_data_docs``
    renders all of them. The ephemeral context's own site points at a temp dir; it is redirected here.
    """
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # our tqdm bar is the one to watch
    context.update_data_docs_site(DATA_DOCS_SITE, {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(data_docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    })
    source = context.data_sources.add_pandas("cacara")
    results = []
    for table, expectations in _expectations(config).items():
        chosen = [(check, exp) for check, exp in expectations if check in severities]
        if not chosen:
            continue
        suite = context.suites.add(gx.ExpectationSuite(name=f"{SUITE_PREFIX}{table}"))
        for check, exp in chosen:
            exp.meta = {"check": check, "severity": severities[check]}
            exp.severity = severities[check]
            exp.notes = f"{severities[check]} check `{check}` (params.yaml validate.{severities[check]})"
            suite.add_expectation(exp)
        batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{SUITE_PREFIX}{table}", data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": tables[table]},
                                result_format={"result_format": "COMPLETE",
                                               "unexpected_index_column_names": TABLE_KEYS[table]})
        results.append((table, result))
    if data_docs_dir.exists():
        shutil.rmtree(data_docs_dir)  # pages of an earlier run would otherwise linger beside the new index
    context.build_data_docs(site_names=[DATA_DOCS_SITE])
    return results, data_docs_dir / "index.html"


# ------------------------------------------------------------------------------------------------ report

def _jsonable(value: Any) -> Any:
    """Strict JSON: NaN/inf become null (json.dumps would write the invalid ``NaN`` token)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item"):  # numpy scalars
        return _jsonable(value.item())
    return str(value)


def _row_id(table: str, row: dict[str, Any]) -> str:
    if table in SPLIT_KEY_TABLES:
        return str(row.get("split"))
    cid = row.get("clip_id")
    if cid is None or (isinstance(cid, float) and math.isnan(cid)):
        return f"line {row.get(LINE_COLUMN)}" if row.get(LINE_COLUMN) is not None else "?"
    return str(cid)


def _fold(results: list[tuple[str, Any]], severities: dict[str, str]) -> list[ExpectationOutcome]:
    """GX expectation results -> one outcome per logical check, in params order."""
    outcomes = {name: ExpectationOutcome(name=name, severity=sev, success=True) for name, sev in severities.items()}
    for table, suite_result in results:
        for er in suite_result.results:
            d = er.to_json_dict()
            cfg, res = d["expectation_config"], d.get("result") or {}
            outcome = outcomes[cfg["meta"]["check"]]
            exc = d.get("exception_info") or {}
            raised = bool(exc.get("raised_exception"))
            success = bool(d["success"]) and not raised
            rows = _jsonable(res.get("unexpected_index_list") or [])
            kwargs = {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id", "result_format")}
            observed = {"type": cfg["type"], "table": table, "kwargs": _jsonable(kwargs), "success": success}
            for key in ("observed_value", "element_count", "unexpected_count", "unexpected_percent",
                        "missing_count", "details"):
                if key in res:
                    observed[key] = _jsonable(res[key])
            if "partial_unexpected_list" in res:
                observed["partial_unexpected_list"] = _jsonable(res["partial_unexpected_list"])
            if raised:
                observed["exception"] = exc.get("exception_message")
                log.error("GX expectation %s on %s raised: %s", cfg["type"], table, exc.get("exception_message"))
            outcome.observed.append(observed)
            if not success:
                outcome.success = False
                for row in rows:
                    rid = _row_id(table, row)
                    if rid not in outcome.offending_ids:
                        outcome.offending_ids.append(rid)
                    if len(outcome.offending_rows) < REPORT_MAX_ROWS:
                        outcome.offending_rows.append({"table": table, **row})
    return list(outcomes.values())


def _data_docs_pages(data_docs_dir: Path) -> list[Path]:
    """The per-run validation pages GX nests under validations/<suite>/<run>/<time>/."""
    return sorted((data_docs_dir / "validations").rglob("*.html"))


def _write_html(path: Path, result: ValidationResult, data_docs_dir: Path) -> None:
    """A one-page summary beside the JSON: GX buries each run four folders deep in Data Docs."""
    def rel(p: Path) -> str:
        return html.escape(Path(os.path.relpath(p, path.parent)).as_posix())

    rows = []
    for e in result.expectations:
        status = "pass" if e.success else ("FAIL" if e.severity == CRITICAL else "warn")
        ids = ", ".join(e.offending_ids[:MESSAGE_MAX_IDS])
        more = f" (+{len(e.offending_ids) - MESSAGE_MAX_IDS} more)" if len(e.offending_ids) > MESSAGE_MAX_IDS else ""
        rows.append(f"<tr class='{status}'><td>{html.escape(e.name)}</td><td>{e.severity}</td>"
                    f"<td>{status}</td><td>{html.escape(ids + more)}</td></tr>")
    pages = "".join(f"<li><a href='{rel(p)}'>{html.escape(p.relative_to(data_docs_dir / 'validations').parts[0])}"
                    f"</a></li>" for p in _data_docs_pages(data_docs_dir))
    verdict = "passed" if result.success else "FAILED"
    doc = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Dataset validation: {verdict}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}tr.FAIL{{background:#fdd}}
tr.warn{{background:#ffd}}tr.pass{{background:#dfd}}</style></head><body>
<h1>Dataset validation {verdict}</h1>
<p>{result.n_clips} manifest rows, {result.n_captions} captions.
Full Great Expectations Data Docs: <a href="{rel(result.data_docs_index)}">index</a>.</p>
<table><tr><th>check</th><th>severity</th><th>result</th><th>offending (first {MESSAGE_MAX_IDS})</th></tr>
{''.join(rows)}</table>
<h2>Data Docs validation pages</h2><ul>{pages}</ul>
</body></html>
"""
    path.write_text(doc, encoding="utf-8")


def _table_level_notes(outcome: ExpectationOutcome) -> list[str]:
    """Failed table-level expectations name no rows (a missing column, an empty table): say what GX saw."""
    notes = []
    for ob in outcome.observed:
        if ob["success"] or ob.get("unexpected_count"):
            continue
        seen = ob.get("exception") or (ob.get("details") or {}).get("mismatched") or ob.get("observed_value")
        notes.append(f"{ob['type']} on {ob['table']}: {seen}")
    return notes


def _failure_message(failed: list[ExpectationOutcome], json_path: Path) -> str:
    parts = []
    for e in failed:
        ids = ", ".join(e.offending_ids[:MESSAGE_MAX_IDS])
        more = f", +{len(e.offending_ids) - MESSAGE_MAX_IDS} more" if len(e.offending_ids) > MESSAGE_MAX_IDS else ""
        notes = "".join(f" ({n})" for n in _table_level_notes(e))
        parts.append((f"{e.name} [{ids}{more}]" if ids else e.name) + notes)
    return f"dataset validation failed, critical: {'; '.join(parts)} (report: {json_path})"


# -------------------------------------------------------------------------------------------- entry point

def validate(dataset_dir: str | Path, report_dir: str | Path, config: ValidateConfig) -> ValidationResult:
    """Validate a canonical dataset folder; write ``validation.json``, ``validation.html`` and
    ``data_docs/`` under ``report_dir``; raise :class:`ValidationFailed` if a critical check failed."""
    dataset_dir, report_dir = Path(dataset_dir), Path(report_dir).resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    severities = _severities(config)

    manifest, clips = _read_manifest_rows(dataset_dir)
    log.info("validate: %d manifest rows (%d parseable) in %s", len(manifest), len(clips), dataset_dir)
    audio = audio_stats_table(clips, dataset_dir if dataset_dir.is_dir() else dataset_dir.parent,
                              config.audio.sample_rate, config.audio.max_file_bytes, config.validate_.clip_level)
    captions = _add_language_flags(_caption_rows(clips), config, run="training_language" in severities)
    tables = {"manifest": manifest, "audio": audio, "captions": captions, "splits": _split_rows(manifest, config)}

    data_docs_dir = report_dir / DATA_DOCS_DIR
    results, index = _run_suites(tables, config, severities, data_docs_dir)
    outcomes = _fold(results, severities)
    success = all(e.success for e in outcomes if e.severity == CRITICAL)
    result = ValidationResult(success=success, expectations=outcomes, json_path=report_dir / JSON_NAME,
                              html_path=report_dir / HTML_NAME, data_docs_index=index,
                              n_clips=len(manifest), n_captions=int(captions["caption"].notna().sum()))

    report = {
        "success": success,
        "dataset": str(dataset_dir),
        "n_clips": result.n_clips,
        "n_captions": result.n_captions,
        "failed_critical": [e.name for e in result.failed(CRITICAL)],
        "failed_warning": [e.name for e in result.failed(WARNING)],
        "data_docs_index": Path(os.path.relpath(index, report_dir)).as_posix(),
        "params": config.model_dump(by_alias=True),
        "expectations": [e.to_json() for e in outcomes],
    }
    result.json_path.write_text(json.dumps(_jsonable(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                                encoding="utf-8")
    _write_html(result.html_path, result, data_docs_dir)

    for e in result.failed(WARNING):
        log.warning("validation warning %s: %d offending (%s)", e.name, len(e.offending_ids),
                    ", ".join(e.offending_ids[:MESSAGE_MAX_IDS]))
    if not success:
        message = _failure_message(result.failed(CRITICAL), result.json_path)
        log.error(message)
        raise ValidationFailed(message, result)
    log.info("validation passed (%d checks, %d warnings); report %s", len(outcomes),
             len(result.failed(WARNING)), result.json_path)
    return result
