"""docs/robustness.md stays true: each row names a test that pytest collects, and every case of the hostile-input
and property tests has a row, so a new case cannot go undocumented nor a removed test stay listed."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO

TABLE = REPO / "docs" / "robustness.md"
CASE_FILES = ("tests/test_hostile.py", "tests/test_properties.py")


def _rows() -> dict[str, list[str]]:
    """Test ids named in the table, per section (## Bad input, ## Faults)."""
    sections: dict[str, list[str]] = {}
    current = ""
    for line in TABLE.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            current = line[3:].strip()
        elif line.startswith("|") and (ids := re.findall(r"`(tests/[\w/]+\.py::[^`]+)`", line)):
            sections.setdefault(current, []).extend(ids)
    return sections


def _collected(files: set[str]) -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *sorted(files)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {ln.strip() for ln in proc.stdout.splitlines() if "::" in ln}


def test_every_row_names_a_collected_test_and_every_case_has_a_row():
    sections = _rows()
    assert len(sections.get("Bad input", [])) >= 20 and len(sections.get("Faults", [])) >= 4, \
        {k: len(v) for k, v in sections.items()}
    named = {i for ids in sections.values() for i in ids}
    collected = _collected({i.split("::", 1)[0] for i in named} | set(CASE_FILES))
    missing = sorted(named - collected)
    assert not missing, f"docs/robustness.md names tests that do not exist: {missing}"
    undocumented = sorted(c for c in collected if c.startswith(CASE_FILES) and c not in named)
    assert not undocumented, f"cases without a row in docs/robustness.md: {undocumented}"
