"""How well each frozen text tower matches a language's captions to their English originals.

Why this exists: CACARA trains the audio branch against English captions only, so a query in language
L reaches the right clip only as far as the frozen tower puts L's caption near the English one. This
script measures that ceiling directly, with no audio: for every clip, the L caption's nearest English
caption (cosine, the tower's own vectors) among the same clips; R@1 is the share that lands on its own
clip. A language the tower cannot match here cannot beat chance much in text->audio retrieval either,
whatever the audio branch learns; the English-only tower shows how far shared spelling alone gets.
Vectors are centred as the model centres them (``model.text_centering`` in params.yaml, means from
the ``model.centroid_splits`` captions; ``--centering`` overrides), so the table shows the tower as
the trained model sees it.

Reads the cached caption embeddings of the embed_text step (``work/text_emb``) and embeds only what
is missing (a tower not cached, e.g. ``use-multilingual``). Writes a markdown table.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/tower_alignment.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cacara.manifest import Clip, read_manifest  # noqa: E402
from cacara.params import load_params  # noqa: E402
from cacara.config import EmbedTextConfig  # noqa: E402
from components.embed_text import encoders_needed  # noqa: E402
from model.text_cache import TextEmbeddingCache, encoder_for_cache  # noqa: E402
from model.text_centering import MODES, TextCentroids, texts_by_language  # noqa: E402
from model.text_encoders import composite_parts, declared_languages, l2_normalise  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "tower_alignment.md"
ENGLISH = "en"
#: Languages to name in the summary line: the weakest this many for the first tower.
WEAKEST = 8

logger = logging.getLogger("tower_alignment")


def translation_r1(cache: TextEmbeddingCache, clips: list[Clip], language: str,
                   centroids: TextCentroids | None = None) -> float | None:
    """Share of clips whose ``language`` caption is nearest to their own English caption, or None when
    some clip lacks a caption in that language (the set would differ from the English one)."""
    if not clips or any(not c.captions.get(language) for c in clips):
        return None
    centroids = centroids or TextCentroids("none")
    english = centroids.apply(l2_normalise(cache.get([c.captions[ENGLISH][0] for c in clips])), ENGLISH)
    queries = centroids.apply(l2_normalise(cache.get([c.captions[language][0] for c in clips])), language)
    hits = (queries @ english.T).argmax(axis=1) == np.arange(len(clips))
    return float(hits.mean() * 100)


def tower_cache(text_emb: Path, encoder: str, clips: list[Clip]) -> TextEmbeddingCache:
    """The embed_text cache for ``encoder``, topped up in memory with any caption it lacks; a composite
    is assembled from its towers' caches (topped up the same way), never read from a file an older
    composite rule may have written."""
    cache = TextEmbeddingCache(text_emb, encoder, load=composite_parts(encoder) is None)
    texts = [t for c in clips for caps in c.captions.values() for t in caps[:1]]
    if cache.missing(texts):
        logger.info("%s: embedding %d captions not in %s", encoder, len(cache.missing(texts)), text_emb)
        cache.add(texts, encoder_for_cache(encoder, lambda tower: tower_cache(text_emb, tower, clips)))
    return cache


def common(table: dict[str, dict[str, float | None]], columns: list[str]) -> list[str]:
    """Languages with a score in every column: the set a mean can compare towers on."""
    return [lang for lang, row in table.items() if all(row.get(c) is not None for c in columns)]


def render(table: dict[str, dict[str, float | None]], columns: list[str], sizes: dict[str, int],
           meta: dict[str, str]) -> str:
    lines = ["# Frozen text towers: each language's captions matched to their English originals", "",
             "Produced by `benchmarks/tower_alignment.py`. R@1 % of a clip's caption in the language finding "
             "its own clip's English caption among the set's English captions (cosine of the tower's vectors, "
             "centred as the model centres them). "
             "`-`: some clip of the set has no caption in that language.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| language | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines.append("| chance | " + " | ".join(f"{100 / sizes[c]:.1f}" for c in columns) + " |")
    lines.append("| **mean of the languages every column scores** | " + " | ".join(
        f"**{np.mean([table[lang][c] for lang in common(table, columns)]):.1f}**" for c in columns) + " |")
    for language, row in sorted(table.items()):
        cells = [f"{row[c]:.1f}" if row.get(c) is not None else "-" for c in columns]
        lines.append(f"| {language} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", type=Path, default=REPO / "work" / "dataset")
    ap.add_argument("--text-emb", type=Path, default=REPO / "work" / "text_emb")
    ap.add_argument("--encoders", nargs="+",
                    help="default: params model.text_encoder first, then every tower embed_text caches")
    ap.add_argument("--splits", nargs="+", default=["all", "test"],
                    help="columns: 'all', a split name, or split names joined by ',' (e.g. train,val)")
    ap.add_argument("--centering", choices=MODES, help="default: model.text_centering of params.yaml")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    all_params = load_params()
    params = all_params["model"]
    args.encoders = args.encoders or list(dict.fromkeys([params["text_encoder"], *encoders_needed(EmbedTextConfig.from_params(all_params))]))
    centering = args.centering or params["text_centering"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    clips = read_manifest(args.dataset / "manifest.jsonl")
    sets = {s: clips if s == "all" else [c for c in clips if c.split in s.split(",")] for s in args.splits}
    empty = [s for s, subset in sets.items() if not subset]
    if empty:
        ap.error(f"--splits {' '.join(empty)}: no clips; the manifest's splits are "
                 f"{', '.join(sorted({c.split for c in clips}))}")
    languages = sorted({lang for c in clips for lang in c.captions} - {ENGLISH})
    table: dict[str, dict[str, float | None]] = {lang: {} for lang in languages}
    columns, sizes = [], {}
    for encoder in args.encoders:
        cache = tower_cache(args.text_emb, encoder, clips)
        centroids = TextCentroids.compute(centering, texts_by_language(clips, params["centroid_splits"]), cache,
                                          params["centroid_min_texts"])
        for name, subset in sets.items():
            column = f"{encoder} ({name}, {len(subset)} clips)"
            columns.append(column)
            sizes[column] = len(subset)
            for lang in languages:
                table[lang][column] = translation_r1(cache, subset, lang, centroids)
    first = columns[0]
    ranked = sorted((r[first], lang) for lang, r in table.items() if r.get(first) is not None)
    declared = {e: declared_languages(e) for e in args.encoders}
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "dataset": f"{args.dataset} ({len(clips)} clips, {len(languages)} languages besides English)",
        "centring": f"{centering} (means from the {'/'.join(params['centroid_splits'])} captions)",
        "towers": "; ".join(f"{e}: {len(d) if d else 'all'} declared languages" for e, d in declared.items()),
        f"weakest {WEAKEST} for {first}": ", ".join(f"{lang} {value:.1f}" for value, lang in ranked[:WEAKEST]),
    }
    text = render(table, columns, sizes, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
