"""Step 3, embed_text: every caption in every language, plus the AudioSet class names, through each
frozen text tower once. Later steps read the cache; none of them runs a text encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacara.manifest import iter_captions, read_manifest
from model.text_cache import TextEmbeddingCache

log = logging.getLogger(__name__)


@dataclass
class EmbedTextResult:
    out_dir: Path
    counts: dict[str, tuple[int, int]]  # encoder -> (texts cached, newly embedded this run; 0 for a composite)

    def summary(self) -> str:
        return "embed_text: " + "; ".join(f"{name}: {total} texts ({new} new)"
                                         for name, (total, new) in self.counts.items())


def class_prompts(params: dict[str, Any]) -> list[str]:
    """AudioSet class names as the text tower sees them (used by the text-centric initialisation)."""
    from model.audio_encoders import audio_encoder_class_names

    if params["model"]["init"] != "text_centric":
        return []
    names = audio_encoder_class_names(params["model"]["audio_encoder"])
    return [params["model"]["class_prompt"].format(n) for n in names] if names else []


def embed_text(dataset_dir: str | Path, out_dir: str | Path, params: dict[str, Any]) -> EmbedTextResult:
    """Fill the per-encoder caches in ``out_dir`` with every caption and class prompt not cached yet."""
    from model.text_cache import encoder_for_cache
    from model.text_encoders import composite_parts

    clips = read_manifest(dataset_dir)
    texts = sorted({text for _, _, _, text in iter_captions(clips)} | set(class_prompts(params)))
    counts: dict[str, tuple[int, int]] = {}
    caches: dict[str, TextEmbeddingCache] = {}
    for name in encoders_needed(params):
        # A composite's towers come earlier in this loop, so their caches already hold every text; its
        # own rows are re-assembled from them (no text encoding), never read back from an older run.
        composite = composite_parts(name) is not None
        cache = caches[name] = TextEmbeddingCache(out_dir, name, load=not composite)
        todo = cache.missing(texts)
        new = cache.add(todo, encoder_for_cache(name, caches.__getitem__)) if todo else 0
        cache.save()
        counts[name] = (len(cache), 0 if composite else new)
        log.info("%s: %d texts cached, %s", name, len(cache),
                 "assembled from its towers' caches" if composite else f"{new} embedded now")
    return EmbedTextResult(Path(out_dir), counts)


def encoders_needed(params: dict[str, Any]) -> list[str]:
    """The training tower, the English-only contrast and any extra listed: each embedded once. A
    composite tower's parts come before it."""
    from model.text_encoders import composite_parts

    names = [params["model"]["text_encoder"], params["evaluate"]["english_only_text_encoder"],
             *params["embed_text"]["extra_encoders"]]
    expanded = [t for name in names for t in [*(t for t, _ in composite_parts(name) or []), name]]
    return list(dict.fromkeys(expanded))

