"""The writing system a text is written in, so that a composite tower can leave a tower out of the
texts it cannot read.

Why scripts and not languages: a query arrives without a language tag (the CLI, the service), but
its characters say which script it uses, and a tower's tokenizer reads scripts, not languages. The
16-language USE reads Latin-script Finnish or Basque well enough to help (it shares their subwords
with the languages it was trained on), but an Amharic or Greek caption becomes near-random pieces
(1-6 % caption alignment in ``benchmarks/results/tower_alignment.md``, chance 1.1 %): in a
composite those rows only add noise to the tower that can read them.

Scripts are named by the first word of each letter's Unicode name ("LATIN", "CYRILLIC", "ETHIOPIC"),
with the Japanese and Chinese scripts folded into one group and width variants into their base, and
a text's script is the one most of its letters use (digits and punctuation do not count).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Collection

#: Unicode-name prefixes that one tokenizer family reads as one script (Han, kana and their marks).
SCRIPT_GROUPS = {
    "CJK": "CJK", "IDEOGRAPHIC": "CJK", "HIRAGANA": "CJK", "KATAKANA": "CJK", "KATAKANA-HIRAGANA": "CJK",
}
#: Prefixes of compatibility forms ("FULLWIDTH LATIN CAPITAL LETTER A"): the script is the next word.
WIDTH_PREFIXES = ("FULLWIDTH", "HALFWIDTH")
#: Letters whose name does not say a script (modifier letters such as the okina) are not counted.
NO_SCRIPT = ("MODIFIER",)


def char_script(ch: str) -> str | None:
    """The script group of one letter; None for non-letters and letters without a script."""
    if not ch.isalpha():
        return None
    words = unicodedata.name(ch, "").split()
    if words and words[0] in WIDTH_PREFIXES:
        words = words[1:]
    if not words or words[0] in NO_SCRIPT:
        return None
    return SCRIPT_GROUPS.get(words[0], words[0])


def dominant_script(text: str) -> str | None:
    """The script most of ``text``'s letters are in (ties: the first seen); None without letters."""
    counts = Counter(s for s in map(char_script, text) if s is not None)
    return counts.most_common(1)[0][0] if counts else None


def reads(tower_scripts: Collection[str] | None, script: str | None) -> bool:
    """Whether a tower that declares ``tower_scripts`` (None: every script) can read ``script``
    (None: a text without letters, which every tower is left to embed)."""
    return tower_scripts is None or script is None or script in tower_scripts
