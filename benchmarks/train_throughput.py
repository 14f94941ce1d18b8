"""Training-step throughput of the CACARA audio branch on the available device (CPU or CUDA, fp32/bf16).

Why: the issue asks for proof of the CUDA path (a training step under bf16 autocast, and its speed).
This script runs the project's own model, loss and optimizer on random 10-s waveforms against random
unit text targets, and reports clips/s per precision side by side, as ratios to fp32 on the same
device. It runs anywhere; on a machine without CUDA it measures the CPU and says so.

    .venv/bin/python benchmarks/train_throughput.py --batch 32 --steps 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cacara.params import load_params  # noqa: E402
from model.audio_encoders import build_audio_encoder  # noqa: E402
from model.cacara_model import CacaraModel, LinearHead, set_trainable  # noqa: E402
from model.losses import ContrastiveLoss  # noqa: E402

CLIP_SECONDS = 10.0
TEXT_DIM = 384  # e5-small's width; the head's size barely matters next to the encoder


def run(device: torch.device, precision: str, batch: int, steps: int, warmup: int, trainable: str,
        last_blocks: int, sample_rate: int) -> float:
    """Median seconds per training step (forward, loss, backward, AdamW step)."""
    torch.manual_seed(0)
    encoder = build_audio_encoder("yamnet")
    model = CacaraModel(encoder, LinearHead(encoder.dim, TEXT_DIM), {"out_dim": TEXT_DIM}).to(device)
    head, backbone = set_trainable(model, trainable, last_blocks)
    loss_fn = ContrastiveLoss().to(device)
    opt = torch.optim.AdamW([{"params": head + backbone}, {"params": [loss_fn.logit_scale]}], lr=1e-4)
    waves = torch.randn(batch, int(CLIP_SECONDS * sample_rate), device=device) * 0.1
    lengths = torch.full((batch,), waves.shape[1], device=device)
    target = torch.nn.functional.normalize(torch.randn(batch, TEXT_DIM, device=device), dim=-1)
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with ctx:
            emb = model(waves, lengths)
        loss = loss_fn(emb.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss under {precision} on {device}")
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trainable", default="all", choices=["projection", "last_blocks", "all"])
    ap.add_argument("--last-blocks", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_throughput.md")
    args = ap.parse_args()
    params = load_params()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = ["fp32"] + (["bf16"] if device.type == "cpu" or torch.cuda.is_bf16_supported() else [])
    results = {p: run(device, p, args.batch, args.steps, args.warmup, args.trainable, args.last_blocks,
                      int(params["audio"]["sample_rate"])) for p in precisions}
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [f"# Training-step throughput ({dt.date.today().isoformat()})", "",
             f"- device: {name}; torch {torch.__version__}",
             f"- batch {args.batch} x {CLIP_SECONDS:.0f}-s clips, trainable={args.trainable}, "
             f"median of {args.steps} steps after {args.warmup} warm-up", "",
             "| precision | s/step | clips/s | speed vs fp32 |", "|---|---:|---:|---:|"]
    for p, s in results.items():
        lines.append(f"| {p} | {s:.4f} | {args.batch / s:.1f} | {results['fp32'] / s:.2f} |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
