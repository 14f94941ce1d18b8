"""What each step of YAMNet's C inference path buys, next to oneDNN and onnxruntime.

Why this exists: ``benchmarks/yamnet_speed.py`` compares the finished path with onnxruntime; this
script takes it apart. Its contenders are the same model with the steps of ``model/yamnet_fused.py``
switched on one at a time (``native_kernels``, ``FUSE_SEPARABLE``, ``CHAIN_NATIVE``), plus
onnxruntime on the same float network. Each contender runs in a fresh process per round, so no
contender's weights or plans sit in the caches another one sees, and the rounds rotate the order,
so slow spells of a shared machine hit every contender alike. The table reports the median over all
rounds and repeats, and the speed-up over the all-oneDNN contender. Nothing here asserts on timings.

    HF_HUB_OFFLINE=1 CACARA_WEIGHTS_DIR=work/weights .venv/bin/python benchmarks/yamnet_native_steps.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "yamnet_native_steps.md"
PATCHES_PER_CLIP = 20
PATCH = (1, 96, 64)

#: name -> (C kernels on, FUSE_SEPARABLE, CHAIN_NATIVE); None runs onnxruntime.
CONTENDERS: dict[str, tuple[bool, bool, bool] | None] = {
    "oneDNN for every layer (native_kernels=False)": (False, False, False),
    "C stem + depthwise kernels, oneDNN pointwise": (True, False, False),
    "+ each separable block fused into one call": (True, True, False),
    "+ fused blocks chained patch by patch (the default)": (True, True, True),
    "onnxruntime float (dequantised)": None,
}

logger = logging.getLogger("yamnet_native_steps")


def run_one(name: str, clips: int, warmup: int, repeats: int, threads: int) -> list[float]:
    """Seconds per batch for one contender, measured in this (fresh) process."""
    import torch

    from cacara.runtime import tune_allocator

    tune_allocator()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(clips * PATCHES_PER_CLIP, *PATCH)
    setting = CONTENDERS[name]
    if setting is None:
        import yamnet_speed

        sess = yamnet_speed.ort_session(yamnet_speed.dequantised_graph(yamnet_speed.load_graph())
                                        .SerializeToString(), threads)
        feed = {yamnet_speed.FLOAT_INPUT: x.numpy()}

        def step() -> None:
            sess.run([yamnet_speed.FLOAT_EMBEDDING], feed)
    else:
        import model.yamnet_fused as fused
        from model.yamnet import load_yamnet

        native, fused.FUSE_SEPARABLE, fused.CHAIN_NATIVE = setting
        yamnet = load_yamnet().eval()
        yamnet.native_kernels = native

        def step() -> None:
            with torch.inference_mode():
                yamnet.embed(x)

    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def render(results: dict[str, list[float]], meta: dict[str, str]) -> str:
    base = statistics.median(results[next(iter(CONTENDERS))])
    lines = ["# YAMNet's C inference path, step by step (CPU)", "",
             "Produced by `benchmarks/yamnet_native_steps.py`. Model only: random log-mel patches "
             f"[{PATCHES_PER_CLIP} per 10-s clip] -> embeddings. One fresh process per contender and round; "
             "**speed-up = oneDNN-for-every-layer median / this median**.", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "| contender | median s/batch | clips/s | speed-up over all-oneDNN | runs |",
              "|---|---:|---:|---:|---:|"]
    clips = int(meta["batch"].split()[0])
    for name, times in results.items():
        med = statistics.median(times)
        lines.append(f"| {name} | {med:.4f} | {clips / med:.2f} | {base / med:.3f} | {len(times)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=32, help="batch size in 10-s clips")
    ap.add_argument("--rounds", type=int, default=4, help="fresh processes per contender")
    ap.add_argument("--repeats", type=int, default=6, help="timed runs per process (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one contender, print JSON timings
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, args.clips, args.warmup, args.repeats, args.threads)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    names = list(CONTENDERS)
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(args.rounds):
        order = names[round_ % len(names):] + names[:round_ % len(names)]
        for name in order:
            cmd = [sys.executable, __file__, "--one", name, "--clips", str(args.clips), "--repeats",
                   str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if done.returncode != 0:
                raise RuntimeError(f"contender {name!r} failed ({done.returncode}):\n{done.stderr[-3000:]}")
            times = json.loads(done.stdout.strip().splitlines()[-1])
            results[name] += times
            logger.info("round %d/%d  %-55s median %.1f ms", round_ + 1, args.rounds, name,
                        statistics.median(times) * 1e3)
    from model import native_kernels

    kernels = native_kernels.load()
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "batch": f"{args.clips} clips = {args.clips * PATCHES_PER_CLIP} patches",
        "threads": str(args.threads),
        "rounds x repeats": f"{args.rounds} x {args.repeats} (warm-up {args.warmup} per process), order rotated",
        "native kernels": kernels.path.name if kernels else "not loaded: the C rows ran oneDNN",
        "load average at end": f"{os.getloadavg()[0]:.2f}",
    }
    text = render(results, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
