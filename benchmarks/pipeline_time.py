"""How long `make run`'s pipeline takes from an empty work/, and where the time goes, stage by stage.

Clones the repository's committed state into a temporary folder (so nothing of this checkout's work/
is reused), restores the demo corpus from the in-repo DVC remote, and runs `dvc repro` there with the
project's virtual environment and an empty weights cache, as a newcomer's first `make run` does after
`make setup`. Every output line is time-stamped on arrival; a stage lasts from its "Running stage" line
to the next one, and within a stage the longest gaps between log lines say what took the time (the line
that ends a gap names the work that finished). Results: benchmarks/results/pipeline_time.md.

    .venv/bin/python benchmarks/pipeline_time.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import machine_line, wait_for_quiet  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "pipeline_time.md"
STAGE = re.compile(r"Running stage '([^']+)'")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (INFO|WARNING|ERROR) ([\w.]+): (.*)$")
GAPS_PER_STAGE = 3


def environment(clone: Path) -> dict[str, str]:
    """What the Makefile exports, pointed at the clone (its own code first on the path)."""
    venv_bin = REPO / ".venv" / "bin"
    return {**os.environ, "PYTHONPATH": str(clone), "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
            "BENTOML_DO_NOT_TRACK": "true", "CACARA_WEIGHTS_DIR": str(clone / "work" / "weights"),
            "BENTOML_HOME": str(clone / "work" / "bentoml")}


def timed_lines(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[list[tuple[float, str]], int]:
    """(seconds since start, line) for every line of output (progress bars' carriage returns split too)."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[tuple[float, str]] = []
    buffer = b""
    assert proc.stdout is not None
    while chunk := proc.stdout.read1(65536):
        buffer += chunk
        *done, buffer = re.split(rb"[\r\n]", buffer)
        now = time.monotonic() - start
        lines += [(now, part.decode("utf-8", "replace")) for part in done if part.strip()]
    if buffer.strip():
        lines.append((time.monotonic() - start, buffer.decode("utf-8", "replace")))
    lines.append((time.monotonic() - start, "<end>"))
    return lines, proc.wait()


def stages(lines: list[tuple[float, str]]) -> list[dict]:
    out: list[dict] = []
    for t, line in lines:
        m = STAGE.search(line)
        if m:
            out.append({"name": m.group(1), "start": t, "lines": []})
        elif out:
            out[-1]["lines"].append((t, line))
    for i, stage in enumerate(out):
        stage["end"] = out[i + 1]["start"] if i + 1 < len(out) else lines[-1][0]
        stage["seconds"] = stage["end"] - stage["start"]
        logged = [(t, LOG_LINE.match(line)) for t, line in stage["lines"]]
        logged = [(t, m.group(3)) for t, m in logged if m]
        gaps, previous = [], stage["start"]
        for t, message in logged + [(stage["end"], "(stage ends)")]:
            gaps.append((t - previous, message))
            previous = t
        stage["gaps"] = sorted(gaps, reverse=True)[:GAPS_PER_STAGE]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-load", type=float, default=0.5)
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if not (REPO / ".venv" / "bin" / "dvc").exists():
        raise SystemExit("run `make setup` first: this measures the pipeline, not the install")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        env = environment(clone)
        pull_start = time.monotonic()
        subprocess.run(["dvc", "pull", "-q", "data.dvc"], cwd=clone, env=env, check=True)
        pull_s = time.monotonic() - pull_start
        if not args.no_wait:
            wait_for_quiet(args.max_load)
        lines, rc = timed_lines(["dvc", "repro"], clone, env)
        if rc != 0:
            print("\n".join(line for _, line in lines[-40:]))
            raise SystemExit(f"dvc repro failed (exit {rc})")
    found = stages(lines)
    total = lines[-1][0]
    rows = ["# `make run` pipeline time from an empty work/", "",
            "Written by `benchmarks/pipeline_time.py`: `dvc repro` in a fresh clone of the committed code, "
            "empty `work/` and weights cache, the project's venv. Within each stage, the longest gaps between "
            "log lines; the message is the line that ended the gap, i.e. what had just finished.", "",
            f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- commit: {commit}", f"- machine: {machine_line()}",
            f"- `dvc pull` of the demo corpus (before timing): {pull_s:.1f} s",
            f"- **`dvc repro` in all: {total:.1f} s ({total / 60:.1f} min)**", "",
            "| stage | seconds | share | where the time went (longest gaps: seconds, what finished) |",
            "|---|---:|---:|---|"]
    for s in found:
        gaps = "; ".join(f"{g:.1f} s: {msg[:110]}" for g, msg in s["gaps"] if g >= 0.5)
        rows.append(f"| {s['name']} | {s['seconds']:.1f} | {100 * s['seconds'] / total:.0f} % | {gaps} |")
    text = "\n".join(rows) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
