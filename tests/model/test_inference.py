"""The ONNX export of the audio branch, run by onnxruntime, against the PyTorch modules it came from."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from cacara.audio import decode
from model.audio_encoders import YamnetAudioEncoder
from model.cacara_model import CacaraModel, TextCentricHead, load_model, save_model
from model.inference import (ONNX_FILE, ONNX_KEY, ONNX_SHA_KEY, TEMPLATE_DIR, OnnxAudioEmbedder, TorchAudioEmbedder,
                             attach_onnx_export, check_export, embedder_for, export_audio_branch, length_batches,
                             template_key)
from tests.conftest import DEMO

#: Unit vectors from two float32 implementations of the same network: measured max 5.1e-6 over the clips
#: below (2-core AMD EPYC, AVX2, no AVX-512); 10x margin for other instruction sets.
PARITY_TOL = 5e-5
#: Another batch composition changes onnxruntime's blocking, hence the last bits (measured 8e-8 with AVX2;
#: margin for other instruction sets).
BATCHING_TOL = 1e-5


def _model(weights_dir, seed: int, out_dim: int = 64) -> CacaraModel:
    """A text-centric model as build_model makes one, with random class vectors and a perturbed last block
    (seeded), so two seeds differ in every part the export carries."""
    encoder = YamnetAudioEncoder(cache_dir=weights_dir)
    generator = torch.Generator().manual_seed(seed)
    head = TextCentricHead(encoder.dim, torch.randn(521, out_dim, generator=generator) * 0.05)
    with torch.no_grad():
        head.classifier.weight.copy_(encoder.yamnet.classifier.weight)
        head.classifier.bias.copy_(encoder.yamnet.classifier.bias)
        conv = encoder.yamnet.features[-1].pointwise.conv
        conv.weight.mul_(1 + 0.1 * torch.rand(conv.weight.shape, generator=generator))
    config = {"format_version": 1, "audio_encoder": "yamnet", "text_encoder": "none", "head": "text_centric",
              "in_dim": encoder.dim, "out_dim": out_dim, "num_classes": 521, "sample_rate": 16000}
    return CacaraModel(encoder, head, config).eval()


@pytest.fixture(scope="module")
def model(weights_dir):
    return _model(weights_dir, 0)


@pytest.fixture(scope="module")
def session(model, weights_dir, monkeypatch_module):
    monkeypatch_module.setenv("CACARA_WEIGHTS_DIR", str(weights_dir))
    return OnnxAudioEmbedder(export_audio_branch(model), model.sample_rate)


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def waves(clips) -> list[np.ndarray]:
    """Real recordings of many lengths: under one patch (0.93 s dog), a 0.006 s scrap, several patches,
    and 12 s of demo audio (25 patches)."""
    out = [clips["cow"], clips["dog"], clips["cymbal"], clips["cow"][:100]]
    demo = sorted((DEMO / "audio").glob("*.flac"))[:6]
    out += [decode(p, 16000).samples for p in demo]
    out.append(np.concatenate(out[4:])[:12 * 16000])
    return out


def test_onnxruntime_matches_the_pytorch_modules(model, session, waves):
    ort_rows = session.embed(waves)
    torch_rows = TorchAudioEmbedder(model).embed(waves)
    worst = float(np.abs(ort_rows - torch_rows).max())
    print(f"max |onnxruntime - PyTorch| over {len(waves)} clips: {worst:.2e}")
    assert worst < PARITY_TOL
    assert np.allclose(np.linalg.norm(ort_rows, axis=1), 1.0, atol=1e-5)
    # Not a vacuous match: the clips are told apart.
    assert float((ort_rows[0] * ort_rows[2]).sum()) < 0.99


def test_same_input_gives_the_same_bits_and_batching_changes_only_rounding(session, waves):
    batched = session.embed(waves)
    assert np.array_equal(batched, session.embed(waves))
    alone = np.concatenate([session.embed([w]) for w in waves])
    assert float(np.abs(batched - alone).max()) < BATCHING_TOL
    reordered = session.embed(waves[::-1])[::-1]
    assert float(np.abs(batched - reordered).max()) < BATCHING_TOL


def test_length_batches_sort_by_length_and_respect_the_budget():
    lengths = [5, 100, 7, 100, 30, 1000, 2]
    groups = length_batches(lengths, budget=210)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert groups[0] == [5]  # longer than the budget: alone
    flat = [lengths[i] for g in groups for i in g]
    assert flat == sorted(lengths, reverse=True)
    assert all(len(g) * lengths[g[0]] <= 210 for g in groups if len(g) > 1)


def test_empty_waveform_is_refused(session):
    with pytest.raises(ValueError, match="empty"):
        session.embed([np.zeros(0, np.float32)])


def test_template_export_equals_a_fresh_trace(weights_dir, tmp_path, monkeypatch):
    """Exports reuse a traced template with the model's own weights: the bytes must be those a fresh
    trace of that model gives, and its outputs that model's, not the template donor's."""
    import shutil

    for f in weights_dir.glob("yamnet.safetensors*"):
        shutil.copy(f, tmp_path / f.name)
    a, b = _model(weights_dir, 1, out_dim=48), _model(weights_dir, 2, out_dim=48)
    monkeypatch.setenv("CACARA_WEIGHTS_DIR", str(tmp_path / "one"))
    (tmp_path / "one").mkdir()
    export_audio_branch(a)  # traces a, caches the template
    assert len(list((tmp_path / "one" / TEMPLATE_DIR).iterdir())) == 1
    b_from_template = export_audio_branch(b)
    monkeypatch.setenv("CACARA_WEIGHTS_DIR", str(tmp_path / "two"))
    b_fresh = export_audio_branch(b)  # empty cache: traces b itself
    assert hashlib.sha256(b_from_template).digest() == hashlib.sha256(b_fresh).digest()
    clip = [np.sin(np.arange(20000, dtype=np.float32) * 0.01) * 0.3]
    got = OnnxAudioEmbedder(b_from_template, 16000).embed(clip)
    assert float(np.abs(got - TorchAudioEmbedder(b).embed(clip)).max()) < PARITY_TOL
    assert float(np.abs(got - TorchAudioEmbedder(a).embed(clip)).max()) > 1e-3


def test_model_folder_export_is_checked_against_its_config(model, tmp_path, weights_dir, monkeypatch):
    monkeypatch.setenv("CACARA_WEIGHTS_DIR", str(weights_dir))
    folder = save_model(model, tmp_path / "m", {"train": {}}, "none")
    assert not (folder / ONNX_FILE).exists()
    with pytest.raises(FileNotFoundError, match="no ONNX export"):
        embedder_for(load_model(folder), folder)
    sha = attach_onnx_export(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config[ONNX_SHA_KEY] == sha == hashlib.sha256((folder / ONNX_FILE).read_bytes()).hexdigest()
    loaded = load_model(folder)
    assert isinstance(embedder_for(loaded, folder), OnnxAudioEmbedder)
    assert attach_onnx_export(folder) == sha  # already current: left as it is
    assert config[ONNX_KEY] == template_key(model)
    # An export made by other code (its template key differs) is made again, not kept.
    (folder / "config.json").write_text(json.dumps({**config, ONNX_KEY: "made-by-older-code"}))
    assert attach_onnx_export(folder) == sha
    assert json.loads((folder / "config.json").read_text())[ONNX_KEY] == template_key(model)
    data = bytearray((folder / ONNX_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / ONNX_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        embedder_for(loaded, folder)
    save_model(model, folder, {"train": {}}, "none")  # new weights: the old export must not survive
    assert not (folder / ONNX_FILE).exists()
    assert ONNX_SHA_KEY not in json.loads((folder / "config.json").read_text())


def test_an_encoder_that_does_not_export_runs_the_modules(tiny_wav2vec2, clips, tmp_path):
    """transformers checkpoints extract features in numpy, outside any graph: they keep the modules."""
    from model.audio_encoders import build_audio_encoder
    from model.cacara_model import LinearHead

    encoder = build_audio_encoder(f"hf:{tiny_wav2vec2}")
    config = {"format_version": 1, "audio_encoder": f"hf:{tiny_wav2vec2}", "text_encoder": "none", "head": "linear",
              "in_dim": encoder.dim, "out_dim": 8, "num_classes": 0, "sample_rate": 16000}
    model = CacaraModel(encoder, LinearHead(encoder.dim, 8), config).eval()
    with pytest.raises(ValueError, match="cannot be exported"):
        export_audio_branch(model)
    folder = save_model(model, tmp_path / "hf", {"train": {}}, "none")
    assert attach_onnx_export(folder) is None and not (folder / ONNX_FILE).exists()
    embedder = embedder_for(load_model(folder), folder)
    assert isinstance(embedder, TorchAudioEmbedder)
    rows = embedder.embed([clips["dog"], clips["cow"]])
    assert rows.shape == (2, 8) and np.allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)


def test_an_export_that_is_not_the_network_is_refused(model, session):
    """check_export compares the export with the modules: weights the template swap missed would differ."""
    import onnx

    data = export_audio_branch(model)
    check_export(model, data)
    broken = onnx.load_model_from_string(data)
    init = next(i for i in broken.graph.initializer if i.name.endswith("pointwise.conv.weight"))
    values = onnx.numpy_helper.to_array(init).copy() * 0.5
    init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    with pytest.raises(RuntimeError, match="differs from the PyTorch modules"):
        check_export(model, broken.SerializeToString())


def test_thread_count_follows_the_container_limit(monkeypatch, tmp_path):
    from model import inference

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(inference, "_cgroup_cpus", lambda: 1)
    assert inference.inference_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert inference.inference_threads() == 3
