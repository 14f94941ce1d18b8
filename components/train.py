"""Step 4, train: the audio branch against cached English caption embeddings of a frozen text tower.

Symmetric InfoNCE with a learnable temperature, AdamW with linear warmup and cosine decay, model
selection on validation English recall (epoch 0 is the untrained text-centric model, so selection
can never return something worse than the initialisation), a checkpoint after every epoch that a
rerun resumes from, and data parallelism through ``torchrun`` (gloo on CPU, NCCL on GPUs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from cacara.augment import WaveAugment
from cacara.config import TrainConfig, TrainSection
from cacara.files import exclusive_output
from cacara.data import ClipAudio, batches, pad_batch
from cacara.manifest import read_manifest
from model.cacara_model import (CacaraModel, build_model, embed_waveforms, load_model, save_model,
                                set_trainable, text_centroids_for)
from model.inference import attach_onnx_export
from model.losses import ContrastiveLoss
from model.metrics import retrieval_metrics
from model.text_cache import TextEmbeddingCache

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
MODEL_DIR = "model"
HISTORY = "history.csv"


@dataclass
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_score: float
    epochs_run: int
    resumed_from: int | None
    history: list[dict[str, float]]

    def summary(self) -> str:
        return (f"train: best epoch {self.best_epoch} (val {self.best_score:.2f}), "
                f"{self.epochs_run} epochs run" + (f", resumed after epoch {self.resumed_from}"
                                                   if self.resumed_from is not None else ""))


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_distributed(settings: TrainSection) -> _Dist:
    """Single process unless launched by torchrun (WORLD_SIZE > 1)."""
    want = settings.device
    cuda = torch.cuda.is_available() and want in ("auto", "cuda")
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is visible")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return _Dist(rank, world, device)


def _autocast(settings: TrainSection, device: torch.device):
    """bf16 autocast on GPUs that support it; fp32 elsewhere (CPU bf16 is slower than fp32 here)."""
    prec = settings.precision
    if prec == "fp32" or (prec == "auto" and device.type != "cuda"):
        return nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if prec == "bf16":
            raise RuntimeError("train.precision is bf16 but this GPU does not support bfloat16")
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _lr_lambda(total_steps: int, warmup_steps: int):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return f


def _code_fingerprint() -> str:
    """The training code itself: a checkpoint written by other code is not resumed."""
    import model.audio_encoders, model.cacara_model, model.frontend, model.losses  # noqa: E401
    import model.text_centering, model.yamnet  # noqa: E401

    digest = hashlib.sha256()
    for mod in (model.audio_encoders, model.cacara_model, model.frontend, model.losses, model.text_centering,
                model.yamnet):
        digest.update(Path(mod.__file__).read_bytes())
    digest.update(Path(__file__).read_bytes())
    return digest.hexdigest()[:16]


def inputs_fingerprint(model: CacaraModel, text_rows: np.ndarray) -> str:
    """The numbers a run starts from: the initial model (its text-centric head holds the frozen
    tower's class-name rows), the caption rows it trains and selects against, and their centring.
    The settings alone do not pin these down: a re-assembled composite cache or a new centring rule
    changes them under identical params, and resuming then would finish one run with another's epochs."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(np.ascontiguousarray(text_rows, dtype=np.float32).tobytes())
    centroids = model.text_centroids
    digest.update(json.dumps([centroids.mode, centroids.blocks]).encode())
    for key in sorted(centroids.vectors):
        digest.update(key.encode())
        digest.update(centroids.vectors[key].tobytes())
    return digest.hexdigest()[:16]


def config_hash(config: TrainConfig, text_encoder: str, manifest_sha: str, inputs_sha: str) -> str:
    """What a checkpoint was trained under; resuming under anything else would mix two runs."""
    keys = {"code": _code_fingerprint(), "model": config.model.model_dump(),
            "train": config.train.model_dump(exclude={"device"}), "text_encoder": text_encoder,
            "data": manifest_sha, "audio": config.sample_rate, "inputs": inputs_sha}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _save_checkpoint(path: Path, model: CacaraModel, loss: ContrastiveLoss, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LambdaLR, state: dict[str, Any]) -> None:
    """Weights and optimizer moments as safetensors (no pickle), the rest as JSON, sha256 recorded."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors["loss.logit_scale"] = loss.logit_scale.detach().cpu().reshape(1)
    opt_state = opt.state_dict()
    for pid, st in opt_state["state"].items():
        for name, value in st.items():
            tensors[f"optim.{pid}.{name}"] = torch.as_tensor(value).detach().cpu().reshape(-1).contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    meta = dict(state, sha256=sha, param_groups=opt_state["param_groups"], scheduler=sched.state_dict())
    meta_path = path.with_suffix(".json")
    meta_path.with_name(meta_path.name + ".tmp").write_text(json.dumps(meta, indent=1))
    meta_path.with_name(meta_path.name + ".tmp").replace(meta_path)


def _load_checkpoint(path: Path, model: CacaraModel, loss: ContrastiveLoss, opt: torch.optim.Optimizer,
                     sched: torch.optim.lr_scheduler.LambdaLR) -> dict[str, Any]:
    meta = json.loads(path.with_suffix(".json").read_text())
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    if sha != meta["sha256"]:
        raise RuntimeError(f"checkpoint {path} is corrupt: sha256 {sha} != recorded {meta['sha256']}")
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
    with torch.no_grad():
        loss.logit_scale.copy_(tensors["loss.logit_scale"].reshape(()))
    # Optimizer state ids are positions in the flattened param groups.
    flat = [q for group in opt.param_groups for q in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            shape = () if name == "step" else flat[int(pid)].shape
            state.setdefault(int(pid), {})[name] = value.reshape(shape)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    sched.load_state_dict(meta["scheduler"])
    return meta


def validation_score(model: CacaraModel, val_audio: list[torch.Tensor], val_text: np.ndarray,
                     val_text_clip: list[int], device: torch.device) -> dict[str, float]:
    """English retrieval on the validation split; ``select_metric`` picks the number that selects."""
    emb = embed_waveforms(model, val_audio, device)
    m = retrieval_metrics(val_text, emb, val_text_clip)
    m["mean_R@1"] = 0.5 * (m["t2a_R@1"] + m["a2t_R@1"])
    return m


def train(dataset_dir: str | Path, text_emb_dir: str | Path, out_dir: str | Path, config: TrainConfig,
          text_encoder: str | None = None, resume_from: str | Path | None = None,
          max_epochs_this_run: int | None = None) -> TrainResult:
    """Train and write the selected model to ``out_dir/model``, checkpoints to ``out_dir/checkpoints``.

    ``resume_from`` is the checkpoints folder of an interrupted run (it may be ``out_dir/checkpoints``
    itself, as ``dvc repro`` passes it): a run under the same settings and inputs continues from its last
    epoch, anything else starts afresh. ``max_epochs_this_run`` stops early after that many epochs with
    a valid checkpoint, which is what a preempted node looks like.
    """
    # Only the process that writes holds the folder: torchrun's other ranks (RANK > 0) write nothing there;
    # without WORLD_SIZE > 1 this process is rank 0 whatever RANK says (_setup_distributed).
    writer = int(os.environ.get("WORLD_SIZE") or 1) <= 1 or os.environ.get("RANK", "0") in ("", "0")
    with exclusive_output(out_dir, "train") if writer else nullcontext():
        return _train(dataset_dir, text_emb_dir, out_dir, config, text_encoder, resume_from, max_epochs_this_run)


def _train(dataset_dir: str | Path, text_emb_dir: str | Path, out_dir: str | Path, config: TrainConfig,
           text_encoder: str | None, resume_from: str | Path | None, max_epochs_this_run: int | None) -> TrainResult:
    p = config.train
    augment = WaveAugment(p.augment_gain_db, p.augment_shift_s)
    text_encoder = text_encoder or config.model.text_encoder
    lang = config.training_language
    out = Path(out_dir)
    (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
    dd = _setup_distributed(p)
    torch.manual_seed(p.seed)

    clips = read_manifest(dataset_dir)
    manifest_sha = hashlib.sha256((Path(dataset_dir) / "manifest.jsonl").read_bytes()).hexdigest()
    train_clips = [c for c in clips if c.split == "train" and c.captions_in(lang)]
    val_clips = [c for c in clips if c.split == "val" and c.captions_in(lang)]
    if not train_clips or not val_clips:
        raise ValueError(f"need training and validation clips with {lang!r} captions; "
                         f"got {len(train_clips)} train, {len(val_clips)} val")
    cache = TextEmbeddingCache(text_emb_dir, text_encoder)
    train_caps = [c.captions_in(lang) for c in train_clips]
    val_captions = [(i, t) for i, c in enumerate(val_clips) for t in c.captions_in(lang)]
    centroids = text_centroids_for(config.model, clips, cache)
    val_text = centroids.apply(cache.get([t for _, t in val_captions]), lang)
    # Fails now, not mid-epoch, if embed_text was skipped.
    train_text = cache.get([t for caps in train_caps for t in caps])
    sr = config.sample_rate
    train_audio = ClipAudio(dataset_dir, train_clips, sr)
    val_audio = [w for w in ClipAudio(dataset_dir, val_clips, sr)]

    model = build_model(config.model, p.seed, text_encoder, cache).to(dd.device)
    model.text_centroids = centroids
    inputs_sha = inputs_fingerprint(model, np.concatenate([train_text, val_text]))
    head_params, backbone_params = set_trainable(model, p.trainable, p.last_blocks, p.train_class_vectors)
    loss_fn = ContrastiveLoss(p.init_temperature, p.max_logit_scale).to(dd.device)
    opt = torch.optim.AdamW([
        {"params": head_params, "lr": p.lr_head, "weight_decay": p.weight_decay},
        {"params": backbone_params, "lr": p.lr_backbone, "weight_decay": p.weight_decay},
        {"params": [loss_fn.logit_scale], "lr": p.lr_head, "weight_decay": 0.0},
    ])
    n = len(train_clips)
    per_rank = n // dd.world
    bs = p.batch_size
    steps_per_epoch = math.ceil(per_rank / bs)
    epochs = p.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(epochs * steps_per_epoch, p.warmup_epochs * steps_per_epoch))

    chash = config_hash(config, text_encoder, manifest_sha, inputs_sha)
    settings = config.model_dump()
    last = out / CKPT_DIR / "last.safetensors"
    start_epoch, best_score, best_epoch, history, resumed = 1, -1.0, 0, [], None
    earlier = Path(resume_from) / "last.safetensors" if resume_from is not None else None
    if earlier is not None and earlier.exists() and json.loads(earlier.with_suffix(".json").read_text()).get("config") == chash:
        meta = _load_checkpoint(earlier, model, loss_fn, opt, sched)
        start_epoch, best_score, best_epoch = meta["epoch"] + 1, meta["best_score"], meta["best_epoch"]
        history, resumed = meta["history"], meta["epoch"]
        if dd.main and Path(resume_from).resolve() != (out / CKPT_DIR).resolve():
            shutil.rmtree(out / CKPT_DIR / "best", ignore_errors=True)
            shutil.copytree(Path(resume_from) / "best", out / CKPT_DIR / "best")
        log.info("resuming after epoch %d (best %.2f at epoch %d)", meta["epoch"], best_score, best_epoch)
    elif earlier is not None and earlier.exists():
        log.info("checkpoint in %s was trained under other settings: starting afresh", resume_from)

    # L2-SP: pull the head toward its text-centric initialisation, which already sits in the frozen
    # tower's multilingual space; plain fine-tuning on English drifts toward English-only directions.
    anchor_weight = p.init_anchor
    anchor = {n: q.detach().clone() for n, q in model.head.named_parameters()} if anchor_weight > 0 else {}

    ddp_model = model
    if dd.world > 1:
        ddp_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dd.device.index] if dd.device.type == "cuda" else None)

    def evaluate_and_record(epoch: int, train_loss: float) -> None:
        nonlocal best_score, best_epoch
        if dd.main:
            model.eval()
            m = validation_score(model, val_audio, val_text, [i for i, _ in val_captions], dd.device)
            score = m[p.select_metric]
            row = {"epoch": epoch, "train_loss": train_loss, "temperature": loss_fn.temperature,
                   "lr_head": opt.param_groups[0]["lr"], "val_t2a_R@1": m["t2a_R@1"],
                   "val_a2t_R@1": m["a2t_R@1"], "val_t2a_R@5": m["t2a_R@5"], "val_score": score}
            history.append(row)
            if score > best_score:
                best_score, best_epoch = score, epoch
                save_model(model, out / CKPT_DIR / "best", settings, text_encoder,
                           extra={"epoch": epoch, "val": m, "config": chash, "temperature": loss_fn.temperature})
            _write_history(out / HISTORY, history)
        if dd.world > 1:
            dist.barrier()

    if start_epoch == 1 and resumed is None:
        evaluate_and_record(0, float("nan"))
        if dd.main:
            _save_checkpoint(last, model, loss_fn, opt, sched, {
                "epoch": 0, "best_score": best_score, "best_epoch": best_epoch, "history": history,
                "config": chash})

    ran = 0
    bar = tqdm(range(start_epoch, epochs + 1), desc="train", unit="epoch", disable=None if dd.main else True)
    for epoch in bar:
        if max_epochs_this_run is not None and ran >= max_epochs_this_run:
            break
        # Per-epoch randomness derives from (seed, epoch): nothing to save for an exact resume.
        g = torch.Generator().manual_seed(p.seed * 100003 + epoch)
        perm = torch.randperm(n, generator=g)[dd.rank::dd.world][:per_rank].tolist()
        pick = torch.randint(0, 1 << 30, (n,), generator=g).tolist()
        model.train()
        losses = []
        for idx in batches(len(perm), bs):
            chosen = [perm[i] for i in idx]
            waves, lengths = pad_batch([augment(train_audio[i], sr, g) for i in chosen])
            texts = [train_caps[i][pick[i] % len(train_caps[i])] for i in chosen]
            target = torch.from_numpy(centroids.apply(cache.get(texts), lang)).to(dd.device)
            with _autocast(p, dd.device):
                audio_emb = ddp_model(waves.to(dd.device), lengths.to(dd.device))
            loss = loss_fn(audio_emb.float(), target)
            if anchor:
                loss = loss + anchor_weight * sum(((q - anchor[n]) ** 2).sum() for n, q in model.head.named_parameters())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        train_loss = float(np.mean(losses))
        evaluate_and_record(epoch, train_loss)
        if dd.main:
            _save_checkpoint(last, model, loss_fn, opt, sched, {
                "epoch": epoch, "best_score": best_score, "best_epoch": best_epoch, "history": history,
                "config": chash})
            bar.set_postfix(loss=f"{train_loss:.3f}", T=f"{loss_fn.temperature:.3f}",
                            val=f"{history[-1]['val_score']:.1f}")
            log.info("epoch %d: loss %.4f, temperature %.4f, val %s %.2f", epoch, train_loss,
                     loss_fn.temperature, p.select_metric, history[-1]["val_score"])
        ran += 1
    if dd.main:
        _write_history(out / HISTORY, history)
        # The selected model is published from the checkpoint folder, so a resumed (or already
        # finished) run still produces it after dvc has removed the previous output.
        # The ONNX export is what every CPU consumer runs; it is written once into the selected model.
        attach_onnx_export(out / CKPT_DIR / "best")
        shutil.rmtree(out / MODEL_DIR, ignore_errors=True)
        shutil.copytree(out / CKPT_DIR / "best", out / MODEL_DIR)
        # The history travels with the model: the package step's quality gate compares the selected
        # epoch with epoch 0, the untrained model, on the same validation clips.
        shutil.copyfile(out / HISTORY, out / MODEL_DIR / HISTORY)
    if dd.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return TrainResult(out, best_epoch, best_score, ran, resumed, history)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
