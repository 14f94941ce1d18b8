"""Step 5, evaluate: multilingual retrieval on the test split for every system, with the same code.

Systems: chance (random embeddings), the untrained text-centric model, and any number of named trained
models; the first is the model under test, and an optional contrast (the same training against an
English-only text tower) shows what the method claims: multilinguality survives English-only training
against the frozen multilingual tower and collapses against the English-only one. Captions in every
language of the test split are queries, although training saw English only.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from cacara.config import HEADLINE_METRICS, EvaluateConfig
from cacara.data import ClipAudio
from cacara.manifest import Clip, read_manifest
from model.cacara_model import CacaraModel, build_model, load_model, text_centroids_for
from model.inference import embedder_for
from model.metrics import paired_bootstrap, retrieval_metrics, t2a_hits
from model.text_cache import TextEmbeddingCache
from model.text_centering import TextCentroids

log = logging.getLogger(__name__)

BASELINES = ("chance", "untrained")
#: The names ``make run`` gives the trained model and its English-only contrast.
TRAINED, ENGLISH_ONLY = "trained", "trained_english_only"
HEADLINE = HEADLINE_METRICS


@dataclass
class EvaluateResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    summary_metrics: dict[str, Any]
    systems: list[str]

    def table(self, languages: list[str] | None = None, metric: str = "t2a_R@1") -> str:
        """Language x system table of one metric (what `make run` prints)."""
        by = {(r["system"], r["language"]): r for r in self.rows}
        langs = languages or sorted({r["language"] for r in self.rows})
        header = f"{'lang':<12}" + "".join(f"{s:>22}" for s in self.systems)
        lines = [f"{metric} per language (test split)", header]
        for lang in langs:
            cells = [by.get((s, lang), {}).get(metric) for s in self.systems]
            lines.append(f"{lang:<12}" + "".join(f"{c:>22.1f}" if c is not None else f"{'-':>22}" for c in cells))
        return "\n".join(lines)

    def headline(self, language: str) -> list[tuple[str, dict[str, float] | None, dict[str, float] | None]]:
        """(system, its metrics on ``language``, its mean over the other languages) per system."""
        return [(s, (self.summary_metrics.get(s) or {}).get(language),
                 (self.summary_metrics.get(s) or {}).get("mean_other_languages")) for s in self.systems]

    def markdown(self, language: str = "en") -> str:
        """The summary a pipeline UI shows: headline metrics per system and the checks."""
        lines = ["| system | en t2a R@1 | en t2a R@10 | en a2t R@1 | other languages t2a R@1 |", "|---|---:|---:|---:|---:|"]
        for system, own, others in self.headline(language):
            if own:
                lines.append(f"| {system} | {own['t2a_R@1']:.1f} | {own['t2a_R@10']:.1f} | {own['a2t_R@1']:.1f} | "
                             f"{others['t2a_R@1'] if others else float('nan'):.1f} |")
        checks = self.summary_metrics.get("checks", {})
        lines += ["", *(f"- {k}: {v}" for k, v in checks.items())]
        return "\n".join(lines) + "\n"


def write_html_report(result: EvaluateResult, path: Path, plot: Path, metric: str, min_captions: int) -> None:
    """One self-contained page (plot embedded): what a person opens after a run."""
    import base64
    import html

    by = {(r["system"], r["language"]): r for r in result.rows}
    langs = sorted({r["language"] for r in result.rows})
    head = "".join(f"<th>{html.escape(s)}</th>" for s in result.systems)
    body = []
    for lang in langs:
        n = next((by[(s, lang)]["n_texts"] for s in result.systems if (s, lang) in by), 0)
        cells = "".join(f"<td>{by[(s, lang)][metric]:.1f}</td>" if (s, lang) in by else "<td>-</td>"
                        for s in result.systems)
        faint = " class='few'" if n < min_captions else ""
        body.append(f"<tr{faint}><td>{html.escape(lang)}</td><td>{int(n)}</td>{cells}</tr>")
    image = base64.b64encode(plot.read_bytes()).decode()
    checks = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(str(v))}</li>"
                     for k, v in result.summary_metrics.get("checks", {}).items())
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>CACARA evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:.2em .5em;text-align:right}}td:first-child{{text-align:left}}tr.few{{color:#999}}</style></head><body>
<h1>Multilingual retrieval on the test split</h1>
<p>{html.escape(metric)} in percent; training saw English captions only. Grey rows: fewer than {min_captions}
test captions, left out of means, checks and the plot.</p>
<h2>Checks</h2><ul>{checks}</ul>
<img alt="{html.escape(metric)} per language" src="data:image/png;base64,{image}">
<h2>Per language</h2>
<table><tr><th>language</th><th>captions</th>{head}</tr>{''.join(body)}</table>
</body></html>
""", encoding="utf-8")


def language_queries(clips: list[Clip], language: str) -> tuple[list[str], list[int]]:
    """Captions in ``language`` and the index (in ``clips``) of the clip each describes."""
    texts, owners = [], []
    for i, clip in enumerate(clips):
        for t in clip.captions_in(language):
            texts.append(t)
            owners.append(i)
    return texts, owners


def chance_metrics(n_texts_owners: list[int], n_clips: int, dim: int, draws: int, seed: int) -> dict[str, float]:
    """Random unit vectors through the same metric code, averaged over draws."""
    rng = np.random.default_rng(seed)
    acc: dict[str, float] = {}
    for _ in range(draws):
        t = rng.standard_normal((len(n_texts_owners), dim))
        a = rng.standard_normal((n_clips, dim))
        m = retrieval_metrics(t / np.linalg.norm(t, axis=1, keepdims=True), a / np.linalg.norm(a, axis=1, keepdims=True),
                              n_texts_owners)
        for k, v in m.items():
            acc[k] = acc.get(k, 0.0) + v / draws
    return acc


def _system_rows(name: str, audio_emb: np.ndarray, cache: TextEmbeddingCache, centroids: TextCentroids,
                 clips: list[Clip], languages: list[str], supported: set[str] | None) -> list[dict[str, Any]]:
    rows = []
    for lang in languages:
        texts, owners = language_queries(clips, lang)
        queries = centroids.apply(cache.get(texts), lang)
        m = retrieval_metrics(queries, audio_emb, owners)
        rows.append({"system": name, "language": lang, "text_encoder": cache.encoder_name,
                     "supported": None if supported is None else _base_language(lang) in supported, **m,
                     "_t2a_hits": t2a_hits(queries, audio_emb, owners), "_owners": owners})
    return rows


def untrained_model(config: EvaluateConfig, all_clips: list[Clip], cache: TextEmbeddingCache) -> CacaraModel:
    """The text-centric initialisation with the centring ``train`` would give it: the 'untrained' baseline."""
    model = build_model(config.model, config.seed, config.model.text_encoder, cache)
    model.text_centroids = text_centroids_for(config.model, all_clips, cache)
    return model


def evaluate(dataset_dir: str | Path, text_emb_dir: str | Path, models: Mapping[str, str | Path],
             out_dir: str | Path, config: EvaluateConfig, contrast: str | None = None) -> EvaluateResult:
    """Score every system on every test-split language; write metrics.json, CSV tables and a plot.

    ``models`` maps names to trained model folders; the first is the model under test. ``contrast``
    names the English-only run among them: the checks and the paired bootstrap compare the first model
    with it. Baselines (chance, the untrained initialisation) are always scored.
    """
    if not models:
        raise ValueError("evaluate needs at least one trained model")
    names = list(models)
    if any(n in BASELINES for n in names) or len(set(names)) != len(names):
        raise ValueError(f"model names must be unique and not {BASELINES}: got {names}")
    if contrast is not None and (contrast not in models or contrast == names[0]):
        raise ValueError(f"contrast {contrast!r} must name one of the other models {names[1:]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = config.evaluate
    all_clips = read_manifest(dataset_dir)
    clips = [c for c in all_clips if c.split == "test"]
    if not clips:
        raise ValueError("the test split is empty")
    languages = sorted({lang for c in clips for lang in c.captions})
    waves = [w.numpy() for w in ClipAudio(dataset_dir, clips, config.sample_rate)]

    main_cache = TextEmbeddingCache(text_emb_dir, config.model.text_encoder)
    rows: list[dict[str, Any]] = []
    for lang in languages:
        _, owners = language_queries(clips, lang)
        rows.append({"system": "chance", "language": lang, "text_encoder": "-", "supported": None,
                     **chance_metrics(owners, len(clips), main_cache.dim, ev.chance_draws, ev.chance_seed)})

    systems: list[tuple[str, CacaraModel, Path | None]] = [
        ("untrained", untrained_model(config, all_clips, main_cache), None)]
    systems += [(name, load_model(folder), Path(folder)) for name, folder in models.items()]
    for name, model, folder in systems:
        cache = main_cache if model.config["text_encoder"] == main_cache.encoder_name else \
            TextEmbeddingCache(text_emb_dir, model.config["text_encoder"])
        log.info("evaluating %s (%s) on %d clips, %d languages", name, cache.encoder_name, len(clips), len(languages))
        # Trained models are embedded by their folder's ONNX export; the untrained one is exported now.
        emb = embedder_for(model, folder).embed(waves, progress=True)
        rows += _system_rows(name, emb, cache, model.text_centroids, clips, languages,
                             _languages_of(cache.encoder_name))

    order = ["chance", "untrained", *names]
    summary = _summarise(rows, order, names[0], contrast, config.training_language, ev.min_captions)
    if contrast is not None:
        summary["checks"].update(_significance(rows, names[0], contrast, config.training_language,
                                               out / "paired_bootstrap.csv", config))
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    _write_csv(out / "per_language.csv", rows)
    _plot(rows, order, out / "r1_per_language.png", ev.plot_metric, ev.min_captions)
    result = EvaluateResult(out, rows, summary, order)
    (out / "table.txt").write_text(result.table(metric=ev.plot_metric) + "\n")
    write_html_report(result, out / "report.html", out / "r1_per_language.png", ev.plot_metric, ev.min_captions)
    return result


# Caption language keys (Tux Paint locales) that towers list under another code.
LANGUAGE_ALIASES = {"nb": "no", "nn": "no"}


def _same_language(lang: str, other: str) -> bool:
    """en-GB and en-AU are English: they are neither 'other languages' nor evidence of transfer."""
    return lang.split("-")[0] == other.split("-")[0]


def _base_language(lang: str) -> str:
    base = lang.split("-")[0]
    return LANGUAGE_ALIASES.get(base, base)


def _languages_of(encoder_name: str) -> set[str] | None:
    try:
        from model.text_encoders import declared_languages

        langs = declared_languages(encoder_name)
    except (ImportError, ValueError):
        return None
    return {_base_language(lang) for lang in langs} if langs else None


def _summarise(rows: list[dict[str, Any]], systems: list[str], primary: str, contrast: str | None,
               training_language: str, min_captions: int) -> dict[str, Any]:
    """DVC metrics: per system the training language, the mean over the other languages, and counts.

    Languages with fewer than ``min_captions`` test captions stay in the per-language table but not in
    the means and checks: with one or two captions R@1 is 0 or 100 by luck.
    """
    rows = [r for r in rows if r["n_texts"] >= min_captions]
    out: dict[str, Any] = {}
    for system in systems:
        mine = [r for r in rows if r["system"] == system]
        en = next((r for r in mine if r["language"] == training_language), None)
        others = [r for r in mine if not _same_language(r["language"], training_language)]
        out[system] = {
            training_language: {k: round(en[k], 3) for k in HEADLINE} if en else None,
            "mean_other_languages": {k: round(float(np.mean([r[k] for r in others])), 3) for k in HEADLINE}
            if others else None,
            "languages": len(mine)}
    t, u = out[primary].get(training_language), out["untrained"].get(training_language)
    out["checks"] = {"model_under_test": primary,
                     "trained_beats_untrained_en_t2a_R@1": bool(t and u and t["t2a_R@1"] > u["t2a_R@1"])}
    if contrast is None:
        return out
    trained_by, en_by, other, known = _compared_languages(rows, primary, contrast, training_language)
    out["checks"].update({
        "english_only_contrast": contrast,
        "other_languages_known_to_tower": len(known),
        "known_languages_where_multilingual_beats_english_only_t2a_R@1":
            sum(trained_by[lang]["t2a_R@1"] > en_by[lang]["t2a_R@1"] for lang in known),
        "known_languages_where_english_only_is_not_beaten": sorted(
            lang for lang in known if trained_by[lang]["t2a_R@1"] <= en_by[lang]["t2a_R@1"]),
        "languages_unknown_to_tower": sorted(set(other) - set(known)),
        "unknown_languages_where_multilingual_beats_english_only_t2a_R@1":
            sum(trained_by[lang]["t2a_R@1"] > en_by[lang]["t2a_R@1"] for lang in set(other) - set(known)),
    })
    return out


def _compared_languages(rows: list[dict[str, Any]], primary: str, contrast: str, training_language: str
                        ) -> tuple[dict[str, dict], dict[str, dict], list[str], list[str]]:
    """(model rows, contrast rows, other languages both have, those the model's tower claims).

    The claim under test is about languages the frozen tower knows; the others are reported apart.
    ``rows`` must already be limited to languages with enough test captions.
    """
    trained_by = {r["language"]: r for r in rows if r["system"] == primary}
    en_by = {r["language"]: r for r in rows if r["system"] == contrast}
    other = [lang for lang in trained_by if not _same_language(lang, training_language) and lang in en_by]
    known = [lang for lang in other if trained_by[lang]["supported"] is not False]
    return trained_by, en_by, other, known


def _significance(rows: list[dict[str, Any]], primary: str, contrast: str, training_language: str, path: Path,
                  config: EvaluateConfig) -> dict[str, Any]:
    """Paired bootstrap of the model minus its English-only contrast, t2a R@1, per language the tower knows.

    Writes ``paired_bootstrap.csv`` and returns the languages whose interval lies wholly above or
    wholly below zero: with 29 test clips a one-clip difference is noise, and this says which
    differences are not.
    """
    ev = config.evaluate
    rows = [r for r in rows if r["n_texts"] >= ev.min_captions]
    trained_by, en_by, _, known = _compared_languages(rows, primary, contrast, training_language)
    above, below, table = [], [], []
    for lang in sorted(known):
        t, e = trained_by[lang], en_by[lang]
        diff, lo, hi = paired_bootstrap(t["_t2a_hits"], e["_t2a_hits"], t["_owners"], ev.bootstrap_draws,
                                        ev.bootstrap_seed, ev.bootstrap_confidence)
        table.append({"language": lang, "trained_minus_english_only_t2a_R@1": round(diff, 3),
                      "ci_low": round(lo, 3), "ci_high": round(hi, 3)})
        if lo > 0:
            above.append(lang)
        elif hi < 0:
            below.append(lang)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=["language", "trained_minus_english_only_t2a_R@1", "ci_low", "ci_high"])
        w.writeheader()
        w.writerows(table)
    return {"bootstrap_confidence": ev.bootstrap_confidence,
            "known_languages_significantly_above_english_only": above,
            "known_languages_significantly_below_english_only": below}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = ["system", "language", "text_encoder", "supported", *HEADLINE, "n_texts", "n_clips"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(r[k], 3) if isinstance(r[k], float) else r[k]) for k in keys})


def _plot(rows: list[dict[str, Any]], systems: list[str], path: Path, metric: str, min_captions: int) -> list[str]:
    """Bars per language and system, best first for the model under test; languages with fewer than
    ``min_captions`` test captions are left out (one caption gives 0 or 100 % by luck). Returns the
    languages drawn, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = systems[2] if len(systems) > 2 else systems[-1]
    counted = {r["language"] for r in rows if r["n_texts"] >= min_captions}
    left_out = sorted({r["language"] for r in rows} - counted)
    # Ties broken by name: a set's order changes with the process's hash seed, and so would the plot.
    langs = sorted(counted, key=lambda l: (-next((r[metric] for r in rows if r["system"] == primary
                                                  and r["language"] == l), 0), l))
    by = {(r["system"], r["language"]): r[metric] for r in rows}
    y = np.arange(len(langs))
    height = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(9, max(4, 0.3 * len(langs))))
    for i, system in enumerate(systems):
        ax.barh(y + (i - (len(systems) - 1) / 2) * height, [by.get((system, l), 0) for l in langs], height,
                label=system)
    ax.set_yticks(y, langs, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (%)")
    note = f"languages with >= {min_captions} test captions"
    if left_out:
        note += f"; left out: {len(left_out)} with fewer"
    ax.set_title(f"{metric} per caption language, test split\n(training saw English captions only; {note})",
                 fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return langs
