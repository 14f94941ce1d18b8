"""Which script a text is in (model/text_scripts.py), on captions as Tux Paint's translators wrote them."""

from __future__ import annotations

import pytest

from model.text_scripts import char_script, dominant_script, reads


@pytest.mark.parametrize("text, script", [
    ("A cow.", "LATIN"),
    ("Ein Löwe. Straße", "LATIN"),
    ("Корова.", "CYRILLIC"),
    ("ላም።", "ETHIOPIC"),
    ("गाय।", "DEVANAGARI"),
    ("Αγελάδα.", "GREEK"),
    ("牛。", "CJK"),
    ("ウシ（牛）ー", "CJK"),  # katakana, kanji and the prolonged-sound mark are one group
    ("소.", "HANGUL"),
    ("วัว", "THAI"),
    ("بقرة.", "ARABIC"),
    ("Ｃｏｗ", "LATIN"),  # full-width forms count as their base script
])
def test_dominant_script(text, script):
    assert dominant_script(text) == script


def test_mixed_text_goes_to_the_script_most_letters_use():
    assert dominant_script("USB ケーブルと充電器") == "CJK"  # 3 Latin letters, 8 CJK
    assert dominant_script("Wi-Fi router (ルーター)") == "LATIN"  # 12 Latin letters, 4 CJK
    assert dominant_script("ab αβ") == "LATIN"  # a tie goes to the script seen first


def test_texts_without_letters_and_letters_without_a_script():
    assert dominant_script("") is None and dominant_script("42 !?") is None
    assert char_script("ʻ") is None and char_script("7") is None
    assert dominant_script("ʻʻa") == "LATIN"


def test_reads():
    assert reads(None, "ETHIOPIC")  # a tower that declares nothing reads everything
    assert reads({"LATIN"}, None)  # a text without letters is left to every tower
    assert reads(frozenset({"LATIN", "CYRILLIC"}), "CYRILLIC")
    assert not reads(frozenset({"LATIN"}), "GREEK")
