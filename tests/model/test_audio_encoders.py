"""The AudioEncoder interface: YAMNet on real clips, transformers checkpoints from tiny local saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from model.audio_encoders import AudioEncoder, YamnetAudioEncoder, audio_encoder_class_names, build_audio_encoder


def _batch(clips: dict[str, np.ndarray], names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(clips[n]) for n in names])
    waves = torch.zeros(len(names), int(lengths.max()))
    for i, n in enumerate(names):
        waves[i, : lengths[i]] = torch.from_numpy(clips[n])
    return waves, lengths


@pytest.fixture(scope="module")
def yamnet_encoder(weights_dir) -> YamnetAudioEncoder:
    enc = build_audio_encoder("yamnet", cache_dir=weights_dir)
    assert isinstance(enc, YamnetAudioEncoder)
    return enc.eval()


def test_yamnet_encoder_interface(yamnet_encoder, clips):
    waves, lengths = _batch(clips, ["cow", "dog", "cymbal"])
    with torch.no_grad():
        emb = yamnet_encoder(waves, lengths)
        logits = yamnet_encoder.class_logits(waves, lengths)
        both = yamnet_encoder.embed_and_logits(waves, lengths)
    torch.testing.assert_close(emb, both[0], rtol=0, atol=1e-6)  # forward skips only the classifier
    assert yamnet_encoder.dim == 1024 and yamnet_encoder.sample_rate == 16000
    assert emb.shape == (3, 1024) and logits.shape == (3, 521)
    assert len(yamnet_encoder.class_names) == 521 and yamnet_encoder.has_class_logits
    top = [yamnet_encoder.class_names[i] for i in logits.argmax(dim=1).tolist()]
    assert top[2] in {"Music", "Cymbal", "Percussion"}


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_yamnet_clip_embedding_ignores_batch_padding(yamnet_encoder, clips, grad):
    """Each clip pools only its own patches, and only those are computed, so batching with a longer clip
    changes nothing but rounding: oneDNN may pick another algorithm for another batch size."""
    waves, lengths = _batch(clips, ["dog", "cymbal", "cow"])
    with torch.set_grad_enabled(grad):
        together = yamnet_encoder(waves, lengths)
        for i, name in enumerate(["dog", "cymbal", "cow"]):
            alone = yamnet_encoder(torch.from_numpy(clips[name]).unsqueeze(0))
            torch.testing.assert_close(together[i], alone[0], rtol=0, atol=1e-5)


def test_export_path_equals_forward(yamnet_encoder, clips):
    """export_forward computes the padding patches too and masks them out: the same clip embeddings."""
    waves, lengths = _batch(clips, ["dog", "cymbal", "cow"])
    with torch.no_grad():
        torch.testing.assert_close(yamnet_encoder.export_forward(waves, lengths), yamnet_encoder(waves, lengths),
                                   rtol=0, atol=1e-5)


def test_yamnet_padding_patches_are_not_computed(yamnet_encoder, clips, monkeypatch):
    """A batch is padded to its longest clip; the patches that padding alone makes never reach YAMNet."""
    waves, lengths = _batch(clips, ["dog", "cymbal", "cow"])
    seen = []
    embed = yamnet_encoder.yamnet.embed
    monkeypatch.setattr(yamnet_encoder.yamnet, "embed", lambda patches: seen.append(len(patches)) or embed(patches))
    with torch.no_grad():
        yamnet_encoder(waves, lengths)
    assert seen == [int(yamnet_encoder.frontend.num_patches(lengths).sum())]
    assert seen[0] < waves.shape[0] * yamnet_encoder.frontend(waves).shape[1]


def test_yamnet_encoder_is_deterministic(yamnet_encoder, clips):
    waves, lengths = _batch(clips, ["cow", "cow"])
    with torch.no_grad():
        first = yamnet_encoder(waves, lengths)
        second = yamnet_encoder(waves, lengths)
    assert torch.equal(first[0], first[1]) and torch.equal(first, second)


def test_yamnet_block_groups_and_freezing(weights_dir):
    enc = build_audio_encoder("yamnet", cache_dir=weights_dir)
    groups = enc.block_groups()
    assert [g.name for g in groups] == [f"features.{i}" for i in range(14)] + ["classifier"]
    total = sum(p.numel() for p in enc.parameters())
    assert sum(g.num_parameters for g in groups) == total
    assert enc.set_trainable("projection") == 0
    assert enc.set_trainable("all") == total
    last2 = enc.set_trainable("last:2")
    assert last2 == groups[-1].num_parameters + groups[-2].num_parameters
    assert enc.set_trainable(2) == last2
    with pytest.raises(ValueError):
        enc.set_trainable("last:99")
    with pytest.raises(ValueError):
        enc.set_trainable("some")


def test_yamnet_last_blocks_get_gradients_frozen_do_not(weights_dir, clips):
    enc = build_audio_encoder("yamnet", cache_dir=weights_dir).train()
    enc.set_trainable("last:3")  # features.12, features.13, classifier
    waves, lengths = _batch(clips, ["dog", "cow"])
    emb, logits = enc.embed_and_logits(waves, lengths)
    (emb.mean() + logits.mean()).backward()
    for name, p in enc.named_parameters():
        trains = name.startswith(("yamnet.features.12.", "yamnet.features.13.", "yamnet.classifier."))
        assert p.requires_grad == trains, name
        assert (p.grad is not None) == trains, name


def test_unknown_encoder_name():
    with pytest.raises(ValueError, match="unknown audio encoder"):
        build_audio_encoder("vggish")
    with pytest.raises(ValueError, match="unknown audio encoder"):
        audio_encoder_class_names("vggish")


def test_class_names_without_weights_match_the_built_encoder(yamnet_encoder):
    names = audio_encoder_class_names("yamnet")
    assert names == yamnet_encoder.class_names and len(names) == 521
    assert yamnet_encoder.classifier_layer() is yamnet_encoder.yamnet.classifier
    assert yamnet_encoder.classifier_layer().out_features == len(names)
    assert audio_encoder_class_names("hf:/nowhere") is None  # no classifier; nothing is loaded


# ---- transformers checkpoints, saved tiny and random into tmp_path, loaded with local_files_only ----


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_whisper")
    config = WhisperConfig(
        d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=80, vocab_size=100, max_target_positions=32,
        pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
    )
    WhisperModel(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


def test_hf_wav2vec2_from_local_save(tiny_wav2vec2, clips):
    enc = build_audio_encoder(f"hf:{tiny_wav2vec2}")
    assert isinstance(enc, AudioEncoder)
    assert enc.dim == 32 and not enc.has_class_logits and enc.classifier_layer() is None
    assert [g.name for g in enc.block_groups()] == ["stem", "encoder.layers.0", "encoder.layers.1"]
    enc.eval()
    waves, lengths = _batch(clips, ["dog", "cow"])
    with torch.no_grad():
        together = enc(waves, lengths)
        dog_alone = enc(torch.from_numpy(clips["dog"]).unsqueeze(0))
    assert together.shape == (2, 32)
    torch.testing.assert_close(together[0], dog_alone[0], rtol=0, atol=1e-5)  # padding frames excluded
    with pytest.raises(NotImplementedError):
        enc.class_logits(waves, lengths)


def test_hf_encoder_trains_only_the_chosen_layers(tiny_wav2vec2, clips):
    enc = build_audio_encoder(f"hf:{tiny_wav2vec2}").train()
    enc.set_trainable("last:1")
    waves, lengths = _batch(clips, ["dog", "cow"])
    enc(waves, lengths).square().mean().backward()
    last = {id(p) for p in enc.block_groups()[-1].parameters}
    for name, p in enc.named_parameters():
        assert (p.grad is not None) == (id(p) in last), name


def test_hf_whisper_encoder_from_local_save(tiny_whisper, clips):
    enc = build_audio_encoder(f"hf:{tiny_whisper}").eval()
    assert enc.dim == 32
    assert not any("decoder" in n for n, _ in enc.named_parameters())  # only the encoder is kept
    waves, lengths = _batch(clips, ["dog", "cymbal"])
    with torch.no_grad():
        together = enc(waves, lengths)
        dog_alone = enc(torch.from_numpy(clips["dog"]).unsqueeze(0))
    assert together.shape == (2, 32) and torch.isfinite(together).all()
    torch.testing.assert_close(together[0], dog_alone[0], rtol=0, atol=1e-5)


def test_hf_missing_local_model_does_not_download(tmp_path):
    with pytest.raises(OSError):
        build_audio_encoder(f"hf:{tmp_path / 'absent'}")
