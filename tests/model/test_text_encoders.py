"""Frozen text encoders on real captions: Tux Paint's English captions and their human translations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.text_encoders import (TextEncoder, build_text_encoder, composite_name, composite_parts,
                                 declared_languages)

# Captions of Tux Paint stamps (GPL-2.0-or-later), as its translators wrote them.
CAPTIONS = {
    "en": ["A cow.", "A dog.", "A lion.", "A horse.", "A pig.", "A duck.", "A bee.", "An elephant.",
           "An electric kettle.", "A violin."],
    "de": ["Eine Kuh.", "Ein Hund.", "Ein Löwe.", "Ein Pferd.", "Ein Schwein.", "Eine Ente.", "Eine Biene.",
           "Ein Elefant.", "Ein Wasserkocher.", "Eine Violine."],
    "fr": ["Une vache.", "Un chien.", "Un lion.", "Un cheval.", "Un cochon.", "Un canard.", "Une abeille.",
           "Un éléphant.", "Une bouilloire électrique.", "Un violon."],
    "es": ["Una vaca.", "Un perro.", "Un león.", "Un caballo.", "Un cerdo.", "Un pato.", "Una abeja.",
           "Un elefante.", "Una pava eléctrica.", "Un violín."],
    "ru": ["Корова.", "Собака.", "Лев.", "Лошадь.", "Свинья.", "Утка.", "Пчела.", "Слон.",
           "Электрический чайник.", "Скрипка."],
}
OTHER = ["de", "fr", "es", "ru"]
N = len(CAPTIONS["en"])
OFF_DIAGONAL = ~np.eye(N, dtype=bool)


def _cross_lingual(enc: TextEncoder) -> dict[str, tuple[float, float, float]]:
    """Per language: (mean cosine of translation pairs, of unrelated pairs, nearest-translation accuracy).

    One encode call for every caption: e5's engine has a fixed cost per call.
    """
    langs = ["en", *OTHER]
    emb = enc.encode([c for lang in langs for c in CAPTIONS[lang]]).reshape(len(langs), N, -1)
    out = {}
    for i, lang in enumerate(OTHER, start=1):
        sim = emb[0] @ emb[i].T
        out[lang] = (float(np.diag(sim).mean()), float(sim[OFF_DIAGONAL].mean()), float((sim.argmax(1) == np.arange(N)).mean()))
    return out


@pytest.fixture(scope="module")
def use_m():
    return build_text_encoder("use-multilingual")


@pytest.fixture(scope="module")
def e5():
    return build_text_encoder("e5-small")


@pytest.fixture(scope="module")
def minilm():
    return build_text_encoder("minilm-en")


def _check_rows(enc: TextEncoder, dim: int) -> None:
    out = enc.encode(CAPTIONS["en"][:3])
    assert out.dtype == np.float32 and out.shape == (3, dim) and enc.dim == dim
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(out, enc.encode(CAPTIONS["en"][:3]))  # deterministic
    assert enc.encode([]).shape == (0, dim)


def test_use_multilingual(use_m):
    _check_rows(use_m, 512)
    assert len(use_m.languages) == 16 and {"en", "de", "ru", "zh"} <= set(use_m.languages)
    for lang, (same, other, acc) in _cross_lingual(use_m).items():
        assert same > other + 0.25, lang
        assert acc >= 0.8, lang


def test_e5_small(e5):
    _check_rows(e5, 384)
    assert len(e5.languages) >= 90
    scores = _cross_lingual(e5)
    for lang, (same, other, _) in scores.items():
        # e5's space is anisotropic: everything sits near 0.8, so the margin is small but consistent.
        assert same > other + 0.02, lang
    assert min(scores[lang][2] for lang in ("de", "fr", "es")) >= 0.5


def test_minilm_english_only(minilm, use_m):
    _check_rows(minilm, 384)
    assert minilm.languages == ["en"]
    # Frozen: eval mode, no gradients anywhere.
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.model.parameters())
    english_only, multilingual = _cross_lingual(minilm), _cross_lingual(use_m)
    for lang in ("de", "ru"):
        same, other, _ = english_only[lang]
        assert same < 0.35 and same - other < 0.1, lang  # translations are not close
        assert same < multilingual[lang][0] - 0.3, lang
    # In English it still works: a paraphrase is closer than an unrelated caption.
    e = minilm.encode(["A cow.", "A cow is mooing.", "An electric kettle."])
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_batches_with_progress_bar_match_one_batch(use_m):
    texts = CAPTIONS["en"] * 3
    whole = use_m.encode(texts)
    small = build_text_encoder("use-multilingual", batch_size=4)
    np.testing.assert_allclose(small.encode(texts), whole, atol=1e-5)


def test_rejects_a_bare_string(use_m):
    with pytest.raises(TypeError):
        use_m.encode("A cow.")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT and a WordPiece tokenizer built from a hand-written vocab file."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    path = tmp_path_factory.mktemp("tiny_bert")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "cow", "dog", "cat", "bird",
             "moo", "bark", "electric", "kettle", "##s", "##ing", "."]
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    # transformers 5: the vocabulary goes in as ``vocab=`` (``vocab_file=`` is silently ignored).
    tokenizer = BertTokenizer(vocab=str(vocab))
    assert tokenizer.convert_ids_to_tokens(tokenizer("A cow barks.")["input_ids"]) == ["[CLS]", "a", "cow", "bark", "##s", ".", "[SEP]"]
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(path)
    return path


def test_hf_text_encoder_from_local_save(tiny_bert):
    enc = build_text_encoder(f"hf:{tiny_bert}", languages=["en"])
    _check_rows(enc, 32)
    assert enc.max_tokens == 64  # capped by the model's position table
    assert not enc.model.training and not any(p.requires_grad for p in enc.model.parameters())
    # Masked mean pooling: a caption's embedding does not depend on the padding its batch adds.
    alone = enc.encode(["a cow."])
    padded = enc.encode(["a cow.", "the electric kettle moos and barks and a dog barks ."])
    np.testing.assert_allclose(padded[0], alone[0], atol=1e-5)


def test_hf_text_encoder_missing_model(tmp_path):
    with pytest.raises(OSError):
        build_text_encoder(f"hf:{tmp_path / 'absent'}")


def test_unknown_text_encoder():
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("laser")
    with pytest.raises(ValueError, match="unknown text encoder"):
        declared_languages("laser")


def test_declared_languages_without_loading(use_m, minilm):
    assert declared_languages("use-multilingual") == use_m.languages
    assert declared_languages("minilm-en") == minilm.languages == ["en"]
    assert len(declared_languages("e5-small")) >= 90
    assert declared_languages("hf:/some/checkpoint") == []


def test_composite_names_parse_and_refuse_nonsense():
    assert composite_parts("e5-small") is None
    assert composite_parts("e5-small+use-multilingual*0.2") == [("e5-small", 1.0), ("use-multilingual", 0.2)]
    assert composite_parts("hf:/ckpt/a+b") is None, "an hf path containing '+' is still one checkpoint"
    assert composite_parts("hf:/x+minilm-en*2") == [("hf:/x", 1.0), ("minilm-en", 2.0)]
    for bad, message in [("e5-small+use-multilingual*zero", "not a number"),
                         ("e5-small+use-multilingual*0", "must be positive"),
                         ("e5-small+use-multilingual*-1", "must be positive"),
                         ("e5-small+use-multilingual*nan", "must be positive"),
                         ("e5-small+e5-small*2", "twice")]:
        with pytest.raises(ValueError, match=message):
            composite_parts(bad)
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("e5-small+laser")
    assert composite_parts(composite_name([("e5-small", 1.0), ("use-multilingual", 0.25)])) == [
        ("e5-small", 1.0), ("use-multilingual", 0.25)]


def test_composite_cosine_is_the_weighted_mean_of_its_towers(use_m, minilm):
    weight = 0.5
    composite = build_text_encoder(f"use-multilingual+minilm-en*{weight}", progress=False)
    assert composite.name == "use-multilingual+minilm-en*0.5"
    assert composite.dim == use_m.dim + minilm.dim
    assert composite.languages == declared_languages(composite.name) == use_m.languages  # en is already there
    _check_rows(composite, use_m.dim + minilm.dim)
    texts = CAPTIONS["en"] + CAPTIONS["de"]
    u, m, c = use_m.encode(texts), minilm.encode(texts), composite.encode(texts)
    np.testing.assert_allclose(c @ c.T, (u @ u.T + weight * (m @ m.T)) / (1 + weight), atol=1e-5)
    # The English-only tower cannot match German to English; USE can, and keeps doing so in the mix.
    n = len(CAPTIONS["en"])
    def matched(e): return float(((e[n:] @ e[:n].T).argmax(1) == np.arange(n)).mean())
    assert matched(m) < matched(c) <= matched(u) + 1e-9


def test_composite_from_caches_equals_the_live_composite(use_m, minilm, tmp_path):
    from model.text_cache import CachedComposite, TextEmbeddingCache

    name = "use-multilingual*2+minilm-en"
    texts = CAPTIONS["en"] + CAPTIONS["ru"]
    caches = []
    for enc in (use_m, minilm):
        cache = TextEmbeddingCache(tmp_path, enc.name)
        cache.add(texts, enc)
        caches.append(cache)
    cached = CachedComposite(name, composite_parts(name), caches).encode(texts)
    np.testing.assert_allclose(cached, build_text_encoder(name, progress=False).encode(texts), atol=1e-6)
    # A composite cache from before blocks were recorded holds rows of the older rule: refused by name.
    old = TextEmbeddingCache(tmp_path, name)
    old.add(texts, CachedComposite(name, composite_parts(name), caches))
    old.blocks = None
    old.save()
    with pytest.raises(ValueError, match="run the embed_text step again"):
        TextEmbeddingCache(tmp_path, name)
    assert len(TextEmbeddingCache(tmp_path, name, load=False)) == 0


def test_composite_with_a_transformers_tower(tiny_bert, use_m):
    """The cluster configuration: a local hf: checkpoint next to a packaged tower, one frozen space."""
    composite = build_text_encoder(f"hf:{tiny_bert}+use-multilingual*0.5", progress=False)
    assert [e.dim for e in composite.encoders] == [32, use_m.dim]
    assert composite.languages == use_m.languages  # the hf tower declares none
    hf = composite.encoders[0]
    assert not hf.model.training and not any(p.requires_grad for p in hf.model.parameters())
    _check_rows(composite, 32 + use_m.dim)


def test_a_composite_leaves_a_tower_out_of_scripts_it_cannot_read(use_m, minilm):
    """USE cannot read Amharic or Greek, the English MiniLM nothing but Latin: their rows for such
    captions are noise, so the composite gives them a zero block and the other tower speaks alone."""
    from model.text_encoders import declared_scripts, reading_towers

    default = [("e5-small", 1.0), ("use-multilingual", 0.2)]
    texts = ["ላም።", "A cow.", "Корова.", "牛。", "Αγελάδα.", "42"]
    np.testing.assert_array_equal(reading_towers(default, texts),
                                  [[1, 0], [1, 1], [1, 1], [1, 1], [1, 0], [1, 1]])
    assert declared_scripts("e5-small") is None and declared_scripts("hf:/x") is None
    with pytest.raises(ValueError, match="single tower"):
        declared_scripts("e5-small+use-multilingual")

    composite = build_text_encoder("use-multilingual+minilm-en", progress=False)
    assert composite.blocks == [use_m.dim, minilm.dim]
    texts = [*CAPTIONS["ru"][:3], *CAPTIONS["en"][:3], "ላም።"]
    rows, u, m = composite.encode(texts), use_m.encode(texts), minilm.encode(texts)
    # Russian: MiniLM left out, the row is USE's own.
    assert np.all(rows[:3, use_m.dim:] == 0)
    np.testing.assert_allclose(rows[:3, :use_m.dim], u[:3], atol=1e-6)
    # English: both towers, each at its share. Amharic: neither reads it, so both stay in.
    np.testing.assert_allclose(rows[3:, :use_m.dim], u[3:] / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(rows[3:, use_m.dim:], m[3:] / np.sqrt(2), atol=1e-6)
