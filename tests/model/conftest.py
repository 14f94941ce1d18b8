"""Fixtures for the model tests: real Tux Paint clips and one YAMNet weights cache per session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FIXTURE_AUDIO = Path(__file__).resolve().parent.parent / "fixtures" / "audio"
SAMPLE_RATE = 16000
CLIPS = {"cow": "cow_white.ogg", "dog": "dog.ogg", "cymbal": "cymbal_crash.ogg"}


@pytest.fixture(scope="session")
def clips() -> dict[str, np.ndarray]:
    """Three real recordings decoded to 16 kHz mono float32 through the project's own decoder."""
    from cacara.audio import decode

    return {name: decode(FIXTURE_AUDIO / fname, SAMPLE_RATE).samples for name, fname in CLIPS.items()}


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Converted once per session in a temporary cache so tests never touch ~/.cache."""
    from model.yamnet import ensure_weights

    path = tmp_path_factory.mktemp("weights")
    ensure_weights(path)
    return path


@pytest.fixture(scope="session")
def yamnet_model(weights_dir: Path):
    from model.yamnet import load_yamnet

    return load_yamnet(weights_dir).eval()


@pytest.fixture(scope="session")
def tiny_wav2vec2(tmp_path_factory) -> Path:
    """A random two-layer wav2vec2 saved locally: the transformers path without any download."""
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_wav2vec2")
    config = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 4), conv_kernel=(10, 8),
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True,
    )
    Wav2Vec2Model(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(path)
    return path
