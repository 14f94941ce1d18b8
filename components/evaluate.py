"""Step 5, evaluate: multilingual retrieval on the test split for every system, with the same code.

Systems: chance (random embeddings), the untrained text-centric model, the trained model, and the
same training with an English-only text tower. Captions in every language of the test split are
queries, although training saw English only: that is the claim under test.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cacara.data import ClipAudio
from cacara.manifest import Clip, read_manifest
from model.cacara_model import CacaraModel, build_model, load_model, text_centroids_for
from model.inference import embedder_for
from model.metrics import paired_bootstrap, retrieval_metrics, t2a_hits
from model.text_cache import TextEmbeddingCache
from model.text_centering import TextCentroids

log = logging.getLogger(__name__)

SYSTEMS = ("chance", "untrained", "trained", "trained_english_only")
HEADLINE = ("t2a_R@1", "t2a_R@5", "t2a_R@10", "t2a_mAP@10", "a2t_R@1", "a2t_R@5", "a2t_R@10", "a2t_mAP@10")


@dataclass
class EvaluateResult:
    out_dir: Path
    rows: list[dict[str, Any]]
    summary_metrics: dict[str, Any]

    def table(self, languages: list[str] | None = None, metric: str = "t2a_R@1") -> str:
        """Language x system table of one metric (what `make run` prints)."""
        by = {(r["system"], r["language"]): r for r in self.rows}
        langs = languages or sorted({r["language"] for r in self.rows})
        header = f"{'lang':<12}" + "".join(f"{s:>22}" for s in SYSTEMS)
        lines = [f"{metric} per language (test split)", header]
        for lang in langs:
            cells = [by.get((s, lang), {}).get(metric) for s in SYSTEMS]
            lines.append(f"{lang:<12}" + "".join(f"{c:>22.1f}" if c is not None else f"{'-':>22}" for c in cells))
        return "\n".join(lines)


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


def untrained_model(params: dict[str, Any], all_clips: list[Clip], cache: TextEmbeddingCache) -> CacaraModel:
    """The text-centric initialisation with the centring ``train`` would give it: the 'untrained' baseline."""
    model = build_model(params, params["model"]["text_encoder"], cache)
    model.text_centroids = text_centroids_for(params, all_clips, cache)
    return model


def evaluate(dataset_dir: str | Path, text_emb_dir: str | Path, model_dir: str | Path,
             english_only_model_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> EvaluateResult:
    """Score every system on every test-split language; write metrics.json, a CSV table and a plot."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ev = params["evaluate"]
    all_clips = read_manifest(dataset_dir)
    clips = [c for c in all_clips if c.split == "test"]
    if not clips:
        raise ValueError("the test split is empty")
    languages = sorted({lang for c in clips for lang in c.captions})
    waves = [w.numpy() for w in ClipAudio(dataset_dir, clips, int(params["audio"]["sample_rate"]))]

    main_cache = TextEmbeddingCache(text_emb_dir, params["model"]["text_encoder"])
    rows: list[dict[str, Any]] = []
    for lang in languages:
        _, owners = language_queries(clips, lang)
        rows.append({"system": "chance", "language": lang, "text_encoder": "-", "supported": None,
                     **chance_metrics(owners, len(clips), main_cache.dim, int(ev["chance_draws"]),
                                      int(ev["chance_seed"]))})

    untrained = untrained_model(params, all_clips, main_cache)
    systems: list[tuple[str, CacaraModel, Path | None, TextEmbeddingCache]] = [
        ("untrained", untrained, None, main_cache),
        ("trained", load_model(model_dir), Path(model_dir), main_cache)]
    en_model = load_model(english_only_model_dir)
    systems.append(("trained_english_only", en_model, Path(english_only_model_dir),
                    TextEmbeddingCache(text_emb_dir, en_model.config["text_encoder"])))
    for name, model, folder, cache in systems:
        if model.config["text_encoder"] != cache.encoder_name:
            raise ValueError(f"{name}: model was trained against {model.config['text_encoder']}, "
                             f"not {cache.encoder_name}")
        log.info("evaluating %s on %d clips, %d languages", name, len(clips), len(languages))
        # Trained models are embedded by their folder's ONNX export; the untrained one is exported now.
        emb = embedder_for(model, folder).embed(waves, progress=True)
        rows += _system_rows(name, emb, cache, model.text_centroids, clips, languages,
                             _languages_of(cache.encoder_name))

    summary = _summarise(rows, params["ingest"]["training_language"], int(ev["min_captions"]))
    summary["checks"].update(_significance(rows, params["ingest"]["training_language"],
                                           out / "paired_bootstrap.csv", ev))
    (out / "metrics.json").write_text(json.dumps(summary, indent=1))
    _write_csv(out / "per_language.csv", rows)
    _plot(rows, out / "r1_per_language.png", ev["plot_metric"])
    result = EvaluateResult(out, rows, summary)
    (out / "table.txt").write_text(result.table(metric=ev["plot_metric"]) + "\n")
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


def _summarise(rows: list[dict[str, Any]], training_language: str, min_captions: int) -> dict[str, Any]:
    """DVC metrics: per system the training language, the mean over the other languages, and counts.

    Languages with fewer than ``min_captions`` test captions stay in the per-language table but not in
    the means and checks: with one or two captions R@1 is 0 or 100 by luck.
    """
    rows = [r for r in rows if r["n_texts"] >= min_captions]
    out: dict[str, Any] = {}
    for system in SYSTEMS:
        mine = [r for r in rows if r["system"] == system]
        en = next((r for r in mine if r["language"] == training_language), None)
        others = [r for r in mine if not _same_language(r["language"], training_language)]
        out[system] = {
            training_language: {k: round(en[k], 3) for k in HEADLINE} if en else None,
            "mean_other_languages": {k: round(float(np.mean([r[k] for r in others])), 3) for k in HEADLINE}
            if others else None,
            "languages": len(mine)}
    t, u = out["trained"].get(training_language), out["untrained"].get(training_language)
    trained_by, en_by, other, known = _compared_languages(rows, training_language)
    out["checks"] = {
        "trained_beats_untrained_en_t2a_R@1": bool(t and u and t["t2a_R@1"] > u["t2a_R@1"]),
        "other_languages_known_to_tower": len(known),
        "known_languages_where_multilingual_beats_english_only_t2a_R@1":
            sum(trained_by[lang]["t2a_R@1"] > en_by[lang]["t2a_R@1"] for lang in known),
        "known_languages_where_english_only_is_not_beaten": sorted(
            lang for lang in known if trained_by[lang]["t2a_R@1"] <= en_by[lang]["t2a_R@1"]),
        "languages_unknown_to_tower": sorted(set(other) - set(known)),
        "unknown_languages_where_multilingual_beats_english_only_t2a_R@1":
            sum(trained_by[lang]["t2a_R@1"] > en_by[lang]["t2a_R@1"] for lang in set(other) - set(known)),
    }
    return out


def _compared_languages(rows: list[dict[str, Any]], training_language: str
                        ) -> tuple[dict[str, dict], dict[str, dict], list[str], list[str]]:
    """(trained rows, English-only rows, other languages both have, those the tower claims).

    The claim under test is about languages the frozen tower knows; the others are reported apart.
    ``rows`` must already be limited to languages with enough test captions.
    """
    trained_by = {r["language"]: r for r in rows if r["system"] == "trained"}
    en_by = {r["language"]: r for r in rows if r["system"] == "trained_english_only"}
    other = [lang for lang in trained_by if not _same_language(lang, training_language) and lang in en_by]
    known = [lang for lang in other if trained_by[lang]["supported"] is not False]
    return trained_by, en_by, other, known


def _significance(rows: list[dict[str, Any]], training_language: str, path: Path, ev: dict[str, Any]
                  ) -> dict[str, Any]:
    """Paired bootstrap of trained minus English-only t2a R@1 per language the tower knows.

    Writes ``paired_bootstrap.csv`` and returns the languages whose interval lies wholly above or
    wholly below zero: with 29 test clips a one-clip difference is noise, and this says which
    differences are not.
    """
    rows = [r for r in rows if r["n_texts"] >= int(ev["min_captions"])]
    trained_by, en_by, _, known = _compared_languages(rows, training_language)
    above, below, table = [], [], []
    for lang in sorted(known):
        t, e = trained_by[lang], en_by[lang]
        diff, lo, hi = paired_bootstrap(t["_t2a_hits"], e["_t2a_hits"], t["_owners"], int(ev["bootstrap_draws"]),
                                        int(ev["bootstrap_seed"]), float(ev["bootstrap_confidence"]))
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
    return {"bootstrap_confidence": float(ev["bootstrap_confidence"]),
            "known_languages_significantly_above_english_only": above,
            "known_languages_significantly_below_english_only": below}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys = ["system", "language", "text_encoder", "supported", *HEADLINE, "n_texts", "n_clips"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (round(r[k], 3) if isinstance(r[k], float) else r[k]) for k in keys})


def _plot(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Ties broken by name: a set's order changes with the process's hash seed, and so would the plot.
    langs = sorted({r["language"] for r in rows},
                   key=lambda l: (-next((r[metric] for r in rows if r["system"] == "trained" and r["language"] == l),
                                        0), l))
    by = {(r["system"], r["language"]): r[metric] for r in rows}
    y = np.arange(len(langs))
    height = 0.2
    fig, ax = plt.subplots(figsize=(9, max(4, 0.3 * len(langs))))
    for i, system in enumerate(SYSTEMS):
        ax.barh(y + (i - 1.5) * height, [by.get((system, l), 0) for l in langs], height, label=system)
    ax.set_yticks(y, langs, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"{metric} (%)")
    ax.set_title(f"{metric} per caption language, test split\n(training saw English captions only)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
