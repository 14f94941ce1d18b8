"""Memory while refusing audio that would decode to far more samples than allowed, side by side with what a
kept clip costs and what decoding the refused file in full would have cost.

Each case runs in a fresh process: ``cacara.audio.decode`` with ingest's bounds (``audio.max_file_bytes``,
``max_seconds = audio.max_duration_s``), or ``ingest`` itself on a one-row manifest. Two figures per case:
the peak of traced Python allocations (tracemalloc: numpy's buffers are traced; torch's resampler is not)
and the growth of the process's peak RSS over its peak after the imports (``ru_maxrss``), both in MB.

    .venv/bin/python benchmarks/resource_bounds.py      # ~1 minute; writes benchmarks/results/resource_bounds.md
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_line  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "resource_bounds.md"

CHILD = r"""
import json, resource, sys, tracemalloc
from pathlib import Path
from cacara import audio
from cacara.config import IngestConfig
from cacara.params import load_params
from components.ingest import ingest
config = IngestConfig.from_params(load_params(overrides={"ingest.max_bad_fraction": 1.0}))
a = config.audio
kind, path, bounded = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "1"
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
outcome = ""
try:
    if kind == "ingest":
        result = ingest(path, path.parent / "out", config)
        outcome = ", ".join(f"{q.reason}" for q in result.quarantined) or f"{len(result.clips)} kept"
    else:
        raw = path.read_bytes()
        out = audio.decode(raw, a.sample_rate, max_bytes=a.max_file_bytes, max_seconds=a.max_duration_s if bounded else None)
        outcome = f"decoded {out.duration_s:.0f} s"
except audio.AudioError as exc:
    outcome = f"refused {exc.reason}"
traced = tracemalloc.get_traced_memory()[1]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "traced_mb": traced / 1e6, "rss_growth_mb": (peak - base) / 1024,
                  "rss_peak_mb": peak / 1024}))
"""


def _files(folder: Path) -> dict[str, Path]:
    import numpy as np
    import soundfile as sf

    def constant_flac(path: Path, seconds: int, sr: int = 8000) -> Path:
        with sf.SoundFile(str(path), "w", sr, 1, format="FLAC", subtype="PCM_16") as f:
            for _ in range(seconds // 10):
                f.write(np.full(sr * 10, 0.25, np.float32))
        return path

    hour = constant_flac(folder / "hour.flac", 3600)
    raw = bytearray(hour.read_bytes())
    raw[8 + 13] &= 0xF0
    raw[8 + 14:8 + 18] = b"\0\0\0\0"
    (folder / "nolength.flac").write_bytes(bytes(raw))
    sf.write(str(folder / "wide.wav"), np.full((50, 256), 0.1, np.float32), 192000, subtype="PCM_16")
    rng = np.random.default_rng(0)
    sf.write(str(folder / "kept30s.flac"), (0.1 * rng.standard_normal(30 * 44100)).astype(np.float32), 44100)
    src = folder / "src"
    src.mkdir()
    (src / "hour.flac").write_bytes(hour.read_bytes())
    (src / "manifest.jsonl").write_text(json.dumps({"clip_id": "hour", "audio": "hour.flac",
                                                    "captions": {"en": ["An hour of hum."]}}) + "\n")
    return {"hour": hour, "nolength": folder / "nolength.flac", "wide": folder / "wide.wav",
            "kept": folder / "kept30s.flac", "src": src / "manifest.jsonl"}


CASES = [  # (label, kind, file key, bounded)
    ("kept: a 30-s 44.1 kHz clip (the longest allowed)", "decode", "kept", True),
    ("refused: FLAC whose header says 3600 s", "decode", "hour", True),
    ("refused: the same FLAC with no length in its header", "decode", "nolength", True),
    ("refused: 256 channels at 192 kHz", "decode", "wide", True),
    ("refused through ingest: a manifest naming the 3600-s FLAC", "ingest", "src", True),
    ("contrast, unbounded: the 3600-s FLAC decoded in full (no max_seconds)", "decode", "hour", False),
]


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = _files(Path(tmp))
        for label, kind, key, bounded in CASES:
            path = files[key]
            proc = subprocess.run([sys.executable, "-c", CHILD, kind, str(path.parent if kind == "ingest" else path),
                                   "1" if bounded else "0"], cwd=ROOT, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"{label}: {proc.stderr[-2000:]}")
            rows.append((label, path.stat().st_size if kind != "ingest" else files["hour"].stat().st_size,
                         json.loads(proc.stdout.strip().splitlines()[-1])))
    kept = rows[0][2]
    lines = [f"| {label} | {size / 1e3:.0f} KB | {r['outcome']} | {r['traced_mb']:.1f} | "
             f"{r['traced_mb'] / kept['traced_mb']:.2f} | {r['rss_growth_mb']:.0f} |" for label, size, r in rows]
    text = f"""# Memory while refusing oversized audio

Written by `benchmarks/resource_bounds.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}.
Machine: {machine_line()}.
Bounds: params.yaml `audio.max_duration_s` and `audio.max_file_bytes`, as ingest applies them; each case in a
fresh process. Traced: peak of Python allocations (tracemalloc; numpy buffers included, torch's resampler not).
RSS growth: the process's peak RSS above its peak after the imports (0 when the case stays below it).

| case | file | outcome | traced peak, MB | vs. the kept clip | RSS growth, MB |
|---|---|---|---|---|---|
{chr(10).join(lines)}
"""
    RESULTS.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
