"""benchmarks/tower_alignment.py: the per-language translation R@1 against a hand-computed case."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from cacara.manifest import Clip, write_manifest
from model.text_cache import TextEmbeddingCache
from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("tower_alignment", REPO / "benchmarks" / "tower_alignment.py")
tower_alignment = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tower_alignment)


class FixedEncoder:
    """A 'tower' that maps each known text to a fixed vector."""

    name = "fixed"

    def __init__(self, table: dict[str, list[float]]):
        self.table = table

    def encode(self, texts):
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def _clip(i: int, captions: dict[str, list[str]]) -> Clip:
    return Clip(clip_id=f"c{i}", audio_path=f"audio/c{i}.flac", captions=captions, duration_s=1.0,
                sample_rate=16000, orig_sample_rate=16000, orig_channels=1, source="test", license="test",
                split="test", sha256="0" * 64)


def test_translation_r1_hand_computed(tmp_path):
    # English captions on three orthogonal axes; the 'xx' captions of clips 0 and 2 point at their own
    # clip's English caption, clip 1's at clip 2's: 2 of 3 land on their own clip.
    table = {"A cow.": [1, 0, 0], "A dog.": [0, 1, 0], "A cat.": [0, 0, 1],
             "Vaca.": [0.9, 0.1, 0], "Perro.": [0.1, 0.2, 0.9], "Gato.": [0, 0.3, 0.8]}
    clips = [_clip(0, {"en": ["A cow."], "xx": ["Vaca."]}),
             _clip(1, {"en": ["A dog."], "xx": ["Perro."]}),
             _clip(2, {"en": ["A cat."], "xx": ["Gato."], "yy": ["Katze."]})]
    cache = TextEmbeddingCache(tmp_path, "fixed")
    cache.add(list(table), FixedEncoder(table))
    assert tower_alignment.translation_r1(cache, clips, "xx") == pytest.approx(200 / 3)
    assert tower_alignment.translation_r1(cache, clips, "en") == 100.0
    assert tower_alignment.translation_r1(cache, clips, "yy") is None  # not every clip has a yy caption


def test_a_split_without_clips_is_refused_by_name(tmp_path, capsys):
    write_manifest([_clip(0, {"en": ["A cow."]}), _clip(1, {"en": ["A dog."]})], tmp_path)  # both in "test"
    with pytest.raises(SystemExit):
        tower_alignment.main(["--dataset", str(tmp_path), "--splits", "test", "train,val"])
    assert "--splits train,val: no clips; the manifest's splits are test" in capsys.readouterr().err
