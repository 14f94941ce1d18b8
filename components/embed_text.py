"""Step 3, embed_text: every caption in every language, plus the AudioSet class names, through each
frozen text tower once. Later steps read the cache; none of them runs a text encoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cacara.config import EmbedTextConfig
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


def class_prompts(config: EmbedTextConfig) -> list[str]:
    """AudioSet class names as the text tower sees them (used by the text-centric initialisation)."""
    from model.audio_encoders import audio_encoder_class_names

    if config.init != "text_centric":
        return []
    names = audio_encoder_class_names(config.audio_encoder)
    return [config.class_prompt.format(n) for n in names] if names else []


def embed_text(dataset_dir: str | Path, out_dir: str | Path, config: EmbedTextConfig,
               cache: str | Path | None = None) -> EmbedTextResult:
    """Write each tower's cache to ``out_dir``: every caption and class prompt of the dataset.

    ``cache`` is an earlier run's output (it may be ``out_dir`` itself, as ``dvc repro`` passes it):
    rows it already holds are reused, only new texts are embedded. Rows of texts the dataset no longer
    has are kept, so a cache only grows.
    """
    import shutil

    from model.text_cache import encoder_for_cache
    from model.text_encoders import composite_parts

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clips = read_manifest(dataset_dir)
    texts = sorted({text for _, _, _, text in iter_captions(clips)} | set(class_prompts(config)))
    counts: dict[str, tuple[int, int]] = {}
    caches: dict[str, TextEmbeddingCache] = {}
    for name in encoders_needed(config):
        # A composite's towers come earlier in this loop, so their caches already hold every text; its
        # own rows are re-assembled from them (no text encoding), never read back from an older run.
        composite = composite_parts(name) is not None
        reuse = cache is not None and not composite
        if reuse:
            earlier, target = (TextEmbeddingCache(d, name, load=False).path for d in (Path(cache), out))
            if earlier.exists() and earlier.resolve() != target.resolve():
                shutil.copyfile(earlier, target)
        store = caches[name] = TextEmbeddingCache(out, name, load=reuse)
        todo = store.missing(texts)
        new = store.add(todo, encoder_for_cache(name, caches.__getitem__)) if todo else 0
        store.save()
        counts[name] = (len(store), 0 if composite else new)
        log.info("%s: %d texts cached, %s", name, len(store),
                 "assembled from its towers' caches" if composite else f"{new} embedded now")
    return EmbedTextResult(out, counts)


def encoders_needed(config: EmbedTextConfig) -> list[str]:
    """The training tower, the English-only contrast and any extra listed: each embedded once. The
    contrast's tower is always embedded: `dvc repro` always trains the contrast (the Kubeflow pipeline's
    switch only skips its training). A composite tower's parts come before it."""
    from model.text_encoders import composite_parts

    names = [config.text_encoder, config.english_only_text_encoder, *config.extra_encoders]
    expanded = [t for name in names for t in [*(t for t, _ in composite_parts(name) or []), name]]
    return list(dict.fromkeys(expanded))
