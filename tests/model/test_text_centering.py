"""Query centring (model/text_centering.py): what it removes, where its means come from, how it is stored."""

from __future__ import annotations

import numpy as np
import pytest

from model.metrics import retrieval_metrics
from model.text_centering import GLOBAL_KEY, TextCentroids, texts_by_language


class DictCache:
    """The one method of TextEmbeddingCache the centroids use, over fixed vectors."""

    def __init__(self, vectors: dict[str, np.ndarray]):
        self.vectors = vectors

    def get(self, texts):
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_language_offset_is_removed_and_retrieval_recovers():
    """Queries = meaning + a strong language direction; the audio side knows only the meaning."""
    rng = np.random.default_rng(0)
    n, dim = 40, 64
    meaning = _unit(rng.standard_normal((n, dim)))
    offset = 3.0 * _unit(rng.standard_normal(dim))
    audio = meaning
    queries = _unit(meaning + offset)
    texts = {f"q{i}": queries[i] for i in range(n)}
    cache = DictCache(texts)
    owners = list(range(n))
    raw = retrieval_metrics(queries, audio, owners)["t2a_R@1"]
    for mode in ("global", "language"):
        cent = TextCentroids.compute(mode, {"de": list(texts)}, cache, min_texts=5)
        centred = cent.apply(queries, "de")
        assert np.allclose(np.linalg.norm(centred, axis=1), 1.0, atol=1e-5)
        assert retrieval_metrics(centred, audio, owners)["t2a_R@1"] > raw + 20


def test_means_and_fallbacks():
    vec = {f"{lang}{i}": np.full(4, float(k), np.float32) for k, lang in enumerate(["en", "pt", "xx"]) for i in range(6)}
    vec["tiny0"] = np.full(4, 9.0, np.float32)
    by_lang = {"en": [f"en{i}" for i in range(6)], "pt": [f"pt{i}" for i in range(6)],
               "xx": [f"xx{i}" for i in range(6)], "tiny": ["tiny0"]}
    cent = TextCentroids.compute("language", by_lang, DictCache(vec), min_texts=5)
    assert set(cent.vectors) == {GLOBAL_KEY, "en", "pt", "xx"}  # "tiny" has 1 text < 5
    assert cent.vector("pt-BR")[0] == 1.0  # base language
    assert cent.vector("tiny")[0] == pytest.approx((0 * 6 + 1 * 6 + 2 * 6 + 9) / 19)  # overall mean
    assert cent.vector(None) is cent.vectors[GLOBAL_KEY]
    glob = TextCentroids.compute("global", by_lang, DictCache(vec), min_texts=5)
    assert set(glob.vectors) == {GLOBAL_KEY} and glob.vector("pt") is glob.vectors[GLOBAL_KEY]
    none = TextCentroids.compute("none", by_lang, DictCache(vec), min_texts=5)
    x = np.ones((2, 4), np.float32)
    assert none.apply(x, "pt") is not None and np.array_equal(none.apply(x, "pt"), x)


def test_unknown_mode_and_empty_text_are_refused():
    with pytest.raises(ValueError, match="expected one of"):
        TextCentroids("per-word")
    with pytest.raises(ValueError, match="needs some captions"):
        TextCentroids.compute("global", {}, DictCache({}), min_texts=5)


def test_save_load_round_trip_and_tamper_check(tmp_path):
    cent = TextCentroids("language", {GLOBAL_KEY: np.arange(3, dtype=np.float32), "de": np.ones(3, np.float32)})
    path, sha = cent.save(tmp_path)
    back = TextCentroids.load(tmp_path, sha)
    assert back.mode == "language" and set(back.vectors) == {GLOBAL_KEY, "de"}
    assert np.array_equal(back.vectors["de"], cent.vectors["de"])
    assert TextCentroids.load(tmp_path, None).mode == "none"  # models saved before centring existed
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with pytest.raises(ValueError, match="sha256"):
        TextCentroids.load(tmp_path, sha)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TextCentroids.load(tmp_path, sha)


def test_test_split_text_never_feeds_the_means():
    class C:
        def __init__(self, split, captions):
            self.split, self.captions = split, captions

    clips = [C("train", {"en": ["a"], "de": ["b"]}), C("val", {"en": ["c"]}), C("test", {"en": ["SECRET"]})]
    got = texts_by_language(clips, ["train", "val"])
    assert got == {"en": ["a", "c"], "de": ["b"]}


def test_a_left_out_tower_block_stays_zero_through_centring(tmp_path):
    """Composite rows whose second tower could not read the text carry a zero block: centring must not
    fill it with minus that block's mean (the same vector in every such query), and that block's mean
    comes only from the rows that have it."""
    rng = np.random.default_rng(1)
    blocks = [3, 2]
    full = _unit(rng.standard_normal((6, 5)) + 2.0)
    partial = full.copy()
    partial[3:, 3:] = 0.0  # rows 3-5: the second tower left out
    vec = {f"t{i}": partial[i] for i in range(6)}
    cache = DictCache(vec)
    cache.blocks = blocks
    cent = TextCentroids.compute("global", {"xx": list(vec)}, cache, min_texts=1)
    assert cent.blocks == blocks
    mean = cent.vectors[GLOBAL_KEY]
    np.testing.assert_allclose(mean[:3], partial[:, :3].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(mean[3:], partial[:3, 3:].mean(axis=0), rtol=1e-6)
    out = cent.apply(partial)
    assert np.all(out[3:, 3:] == 0) and np.all(out[:3, 3:] != 0)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out[3:, :3], _unit(partial[3:, :3] - mean[:3]), atol=1e-6)
    # Without the block layout the zero block would be filled: the behaviour this guards against.
    assert np.all(TextCentroids("global", {GLOBAL_KEY: mean}).apply(partial)[3:, 3:] != 0)
    path, sha = cent.save(tmp_path)
    back = TextCentroids.load(tmp_path, sha)
    assert back.blocks == blocks and np.array_equal(back.apply(partial), out)
    with pytest.raises(ValueError, match="blocks sum"):
        TextCentroids("global", {GLOBAL_KEY: np.zeros(4, np.float32)}, blocks)
