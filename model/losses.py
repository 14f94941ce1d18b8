"""Symmetric InfoNCE (CLIP's loss) with a learnable temperature.

Only the audio side carries gradients in CACARA: the text embeddings come from a frozen encoder's
cache, so the loss is the only place where the two modalities meet during training.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ContrastiveLoss(nn.Module):
    """Cross-entropy over audio->text and text->audio similarity rows, averaged.

    The temperature is learned as ``log(1/T)`` (CLIP's parametrisation: positive by construction,
    and a clamp at ``max_logit_scale`` stops it from collapsing the softmax on small batches).
    """

    def __init__(self, init_temperature: float = 0.07, max_logit_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        value = torch.tensor(math.log(1.0 / init_temperature))
        self.logit_scale = nn.Parameter(value, requires_grad=learnable)
        self.max_log = math.log(max_logit_scale)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.logit_scale.detach().clamp(max=self.max_log).exp())

    def forward(self, audio: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``audio`` and ``text`` are [B, D]; row i of each is a positive pair, every other row a negative."""
        audio = F.normalize(audio.float(), dim=-1)
        text = F.normalize(text.float(), dim=-1)
        scale = self.logit_scale.clamp(max=self.max_log).exp()
        logits = scale * audio @ text.t()
        target = torch.arange(audio.shape[0], device=audio.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
