"""Compare training settings on the VALIDATION split, all languages, side by side in one run.

Used to choose the defaults in params.yaml without looking at the test split. Writes a table to
benchmarks/results/sweep_training.md.

    .venv/bin/python benchmarks/sweep_training.py --set train.epochs=15 \
        --config "last2:train.trainable=last_blocks" --config "proj:train.trainable=projection"
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cacara.data import ClipAudio  # noqa: E402
from cacara.manifest import read_manifest  # noqa: E402
from cacara.params import load_params  # noqa: E402
from components.evaluate import language_queries  # noqa: E402
from cacara.config import TrainConfig  # noqa: E402
from components.train import train  # noqa: E402
from model.cacara_model import build_model, load_model, text_centroids_for  # noqa: E402
from model.inference import embedder_for  # noqa: E402
from model.metrics import retrieval_metrics  # noqa: E402
from model.text_cache import TextEmbeddingCache  # noqa: E402


def _kv(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, _, v in (i.partition("=") for i in items if i)}


def val_scores(model, params, dataset: Path, text_emb: Path, encoder: str) -> dict[str, float]:
    clips = [c for c in read_manifest(dataset) if c.split == "val"]
    emb = embedder_for(model).embed([w.numpy() for w in ClipAudio(dataset, clips, params["audio"]["sample_rate"])])
    cache = TextEmbeddingCache(text_emb, encoder)
    per_lang = {}
    for lang in sorted({l for c in clips for l in c.captions}):
        texts, owners = language_queries(clips, lang)
        if len(texts) >= params["evaluate"]["min_captions"]:
            per_lang[lang] = retrieval_metrics(model.text_centroids.apply(cache.get(texts), lang), emb,
                                               owners)["t2a_R@1"]
    others = [v for k, v in per_lang.items() if k != "en"]
    return {"en": per_lang["en"], "mean_other": float(np.mean(others)), "n_lang": len(per_lang),
            "per_lang": per_lang}


def wins(multi: dict[str, float], english_only: dict[str, float]) -> str:
    """'won/compared' over non-English languages: the issue's target, on validation."""
    langs = [k for k in multi if k.split("-")[0] != "en" and k in english_only]
    return f"{sum(multi[k] > english_only[k] for k in langs)}/{len(langs)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", action="append", default=[], help="override applied to every config")
    ap.add_argument("--config", action="append", default=[], help="NAME:key=value,key=value")
    ap.add_argument("--dataset", default=str(REPO / "work" / "dataset"))
    ap.add_argument("--text-emb", default=str(REPO / "work" / "text_emb"))
    ap.add_argument("--versus-english-only", action="store_true",
                    help="also train each config with the English-only tower and count languages won")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sweep_training.md"))
    args = ap.parse_args()
    rows = []
    base = _kv(args.set)
    params0 = load_params(overrides=base)
    enc = params0["model"]["text_encoder"]
    cache0 = TextEmbeddingCache(args.text_emb, enc)
    config0 = TrainConfig.from_params(params0)
    untrained = build_model(config0.model, config0.train.seed, enc, cache0)
    untrained.text_centroids = text_centroids_for(config0.model, read_manifest(args.dataset), cache0)
    rows.append(("untrained", "", val_scores(untrained, params0, Path(args.dataset), Path(args.text_emb), enc)))
    for spec in args.config:
        name, _, kvs = spec.partition(":")
        params = load_params(overrides={**base, **_kv(kvs.split(","))})
        enc = params["model"]["text_encoder"]
        with tempfile.TemporaryDirectory() as tmp:
            res = train(args.dataset, args.text_emb, tmp, TrainConfig.from_params(params))
            model = load_model(Path(tmp) / "model")
            scores = dict(val_scores(model, params, Path(args.dataset), Path(args.text_emb), enc),
                          best_epoch=res.best_epoch)
            if args.versus_english_only:
                en_enc = params["evaluate"]["english_only_text_encoder"]
                train(args.dataset, args.text_emb, Path(tmp) / "en", TrainConfig.from_params(params), text_encoder=en_enc)
                en_scores = val_scores(load_model(Path(tmp) / "en" / "model"), params, Path(args.dataset),
                                       Path(args.text_emb), en_enc)
                scores["wins"] = wins(scores["per_lang"], en_scores["per_lang"])
            rows.append((name, kvs, scores))
        print(rows[-1], flush=True)
    lines = ["| config | overrides | val en t2a R@1 | val mean other languages t2a R@1 | languages | best epoch "
             "| non-English languages above the English-only tower |",
             "|---|---|---|---|---|---|---|"]
    for name, kvs, s in rows:
        lines.append(f"| {name} | {kvs} | {s['en']:.1f} | {s['mean_other']:.1f} | {s['n_lang']} "
                     f"| {s.get('best_epoch', '-')} | {s.get('wins', '-')} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(f"Common overrides: {args.set}\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
