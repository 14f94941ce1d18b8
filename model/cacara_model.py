"""The CACARA model: a pretrained audio encoder plus a projection into a frozen text tower's space.

Text-centric initialisation (the default): an AudioSet classifier's posteriors weight the frozen text
tower's embeddings of the 521 class names, so the untrained model already lands in the text space and
retrieves zero-shot; contrastive training then refines both the classifier and the class vectors.
The text tower itself is not part of this module: its outputs are cached and never trained.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from model.audio_encoders import AudioEncoder, build_audio_encoder
from model.text_centering import TextCentroids, texts_by_language
from model.weights_cache import safetensors_metadata

if TYPE_CHECKING:
    from cacara.config import ModelSection

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


class TextCentricHead(nn.Module):
    """Audio embedding -> class posteriors -> posterior-weighted sum of class-name text vectors."""

    def __init__(self, in_dim: int, class_vectors: torch.Tensor):
        super().__init__()
        num_classes, out_dim = class_vectors.shape
        self.classifier = nn.Linear(in_dim, num_classes)
        self.to_text = nn.Linear(num_classes, out_dim, bias=False)
        with torch.no_grad():
            self.to_text.weight.copy_(class_vectors.t())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.to_text(torch.sigmoid(self.classifier(h)))


class LinearHead(nn.Module):
    """A plain projection, for encoders without a classifier (or ``model.init: random``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


class CacaraModel(nn.Module):
    """Waveforms [B, T] at 16 kHz -> L2-normalised vectors in the text tower's space."""

    def __init__(self, encoder: AudioEncoder, head: nn.Module, config: dict[str, Any]):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.config = config
        #: How queries are centred before they meet this model's audio vectors (model/text_centering.py).
        self.text_centroids = TextCentroids("none")

    @property
    def sample_rate(self) -> int:
        return int(self.encoder.sample_rate)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.head(self.encoder(waveforms, lengths)).float(), dim=-1)


def _head(kind: str, in_dim: int, out_dim: int, num_classes: int) -> nn.Module:
    if kind == "text_centric":
        return TextCentricHead(in_dim, torch.zeros(num_classes, out_dim))
    if kind == "linear":
        return LinearHead(in_dim, out_dim)
    raise ValueError(f"unknown head {kind!r}")


def build_model(settings: "ModelSection", seed: int, text_encoder: str, text_cache) -> CacaraModel:
    """The untrained model for ``text_encoder``: pretrained audio encoder + initialised projection.

    ``text_cache`` (a TextEmbeddingCache filled by embed_text) supplies the class-name vectors, so
    building a model never runs the text tower. ``seed`` fixes the random parts (a linear head).
    """
    m = settings
    encoder = build_audio_encoder(m.audio_encoder)
    torch.manual_seed(seed)
    classifier = encoder.classifier_layer()  # the pretrained classifier, e.g. YAMNet's AudioSet one
    use_classes = m.init == "text_centric" and encoder.has_class_logits and classifier is not None
    if m.init == "text_centric" and not use_classes:
        log.warning("%s has no classifier: falling back to a random linear projection", encoder.name)
    if use_classes:
        prompts = [m.class_prompt.format(n) for n in encoder.class_names]
        vectors = torch.from_numpy(np.asarray(text_cache.get(prompts), dtype=np.float32))
        if m.center_class_vectors:
            # The towers are anisotropic (e5: unrelated texts at cosine 0.77): the shared direction
            # would dominate every weighted sum and drown the differences between clips.
            vectors = vectors - vectors.mean(dim=0, keepdim=True)
        head: nn.Module = TextCentricHead(encoder.dim, vectors)
        with torch.no_grad():
            head.classifier.weight.copy_(classifier.weight)
            head.classifier.bias.copy_(classifier.bias)
        kind, num_classes = "text_centric", len(prompts)
    else:
        head = LinearHead(encoder.dim, text_cache.dim)
        kind, num_classes = "linear", 0
    config = {"format_version": FORMAT_VERSION, "audio_encoder": m.audio_encoder, "text_encoder": text_encoder,
              "head": kind, "in_dim": encoder.dim, "out_dim": int(text_cache.dim), "num_classes": num_classes,
              "sample_rate": int(encoder.sample_rate)}
    return CacaraModel(encoder, head, config)


def text_centroids_for(settings: "ModelSection", clips, text_cache) -> TextCentroids:
    """The query centring ``model.text_centering`` asks for, estimated from the unpaired caption text
    of ``model.centroid_splits`` (never the test split: its queries must not shape their own centring)."""
    return TextCentroids.compute(settings.text_centering, texts_by_language(clips, settings.centroid_splits),
                                 text_cache, settings.centroid_min_texts)


def set_trainable(model: CacaraModel, mode: str, last_blocks: int, class_vectors: bool = True
                  ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Freeze per ``train.trainable`` and return (head parameters, trainable backbone parameters).

    The encoder's own classifier is not on the embedding path (the head holds a trainable copy), so
    "last N blocks" counts feature blocks only. ``class_vectors=False`` keeps the text-centric head's
    class-name vectors fixed: outputs then stay in the span of what the frozen tower said about the
    521 classes, which is what carries over to languages never seen in training.
    """
    groups = [g for g in model.encoder.block_groups() if g.name != "classifier"]
    n = {"projection": 0, "last_blocks": int(last_blocks), "all": len(groups)}.get(mode)
    if n is None:
        raise ValueError(f"train.trainable must be projection, last_blocks or all, got {mode!r}")
    if not 0 <= n <= len(groups):
        raise ValueError(f"{model.encoder.name} has {len(groups)} blocks; cannot train the last {n}")
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    backbone = [p for g in groups[len(groups) - n:] for p in g.parameters]
    for p in backbone:
        p.requires_grad_(True)
    fixed = {id(model.head.to_text.weight)} if isinstance(model.head, TextCentricHead) and not class_vectors else set()
    head = [p for p in model.head.parameters() if id(p) not in fixed]
    for p in model.head.parameters():
        p.requires_grad_(id(p) not in fixed)
    log.info("training %s: %d backbone blocks (%d params) + head (%d params)", mode, n,
             sum(p.numel() for p in backbone), sum(p.numel() for p in head))
    return head, backbone


def save_model(model: CacaraModel, out_dir: str | Path, settings: dict[str, Any], text_encoder: str,
               extra: dict[str, Any] | None = None) -> Path:
    """safetensors weights (no pickle: safe to load from anywhere) + config.json with their sha256.

    ``settings`` (the training step's config) is recorded as the model's provenance.

    An ONNX export already in ``out_dir`` belongs to other weights and is removed;
    ``model.inference.attach_onnx_export`` writes the new one when the folder is published.
    """
    from model.inference import ONNX_FILE, ONNX_SHA_KEY

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ONNX_FILE).unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = out / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata=safetensors_metadata({"format": "cacara", "text_encoder": text_encoder}))
    tmp.replace(out / WEIGHTS)
    centroids_sha = None
    if model.text_centroids.mode != "none":
        _, centroids_sha = model.text_centroids.save(out)
    config = dict({k: v for k, v in model.config.items() if k != ONNX_SHA_KEY}, text_encoder=text_encoder,
                  sha256=hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest(),
                  text_centroids_sha256=centroids_sha,
                  params=settings, **(extra or {}))
    (out / CONFIG).write_text(json.dumps(config, indent=1, default=float))
    return out


def load_model(model_dir: str | Path, device: str | torch.device = "cpu") -> CacaraModel:
    """Rebuild the architecture from config.json and load weights with strict key checks."""
    d = Path(model_dir)
    if not (d / CONFIG).exists() or not (d / WEIGHTS).exists():
        raise FileNotFoundError(f"{d} is not a CACARA model folder (needs {CONFIG} and {WEIGHTS}); "
                                "train one with `make run` or `cacara train`")
    config = json.loads((d / CONFIG).read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d}: model format {config.get('format_version')} != supported {FORMAT_VERSION}")
    sha = hashlib.sha256((d / WEIGHTS).read_bytes()).hexdigest()
    if sha != config["sha256"]:
        raise ValueError(f"{d / WEIGHTS} does not match its recorded sha256 (corrupt or replaced)")
    encoder = build_audio_encoder(config["audio_encoder"])
    head = _head(config["head"], config["in_dim"], config["out_dim"], config["num_classes"])
    from model.inference import ONNX_SHA_KEY

    kept = {k: config[k] for k in (
        "format_version", "audio_encoder", "text_encoder", "head", "in_dim", "out_dim", "num_classes", "sample_rate")}
    if ONNX_SHA_KEY in config:
        kept[ONNX_SHA_KEY] = config[ONNX_SHA_KEY]
    model = CacaraModel(encoder, head, kept)
    model.load_state_dict(load_file(str(d / WEIGHTS)), strict=True)
    model.text_centroids = TextCentroids.load(d, config.get("text_centroids_sha256"))
    return model.to(device).eval()


@torch.no_grad()
def embed_waveforms(model: CacaraModel, waves: Sequence[torch.Tensor],
                    device: str | torch.device = "cpu") -> np.ndarray:
    """Deterministic clip embeddings [N, D]: whole clips, one per forward pass.

    One clip per pass keeps a clip's vector independent of what else is in the batch (kernels may
    pick different algorithms for different batch shapes), so the same file always gives the same row.
    """
    was_training = model.training
    model.eval()
    out = []
    for w in waves:
        w = torch.as_tensor(w, dtype=torch.float32).reshape(1, -1).to(device)
        out.append(model(w, torch.tensor([w.shape[1]], device=device)).float().cpu().numpy())
    model.train(was_training)
    dim = model.config["out_dim"]
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, dim), dtype=np.float32)
