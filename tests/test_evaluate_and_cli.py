"""evaluate writes every system's per-language metrics; the CLI embedding contract holds."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cacara.manifest import read_manifest
from cacara.config import EmbedTextConfig, EvaluateConfig, TrainConfig
from components.evaluate import ENGLISH_ONLY, TRAINED, evaluate
from components.train import train
from model.cacara_model import load_model
from model.text_encoders import build_text_encoder
from tests.conftest import REPO, write_tone


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory):
    dataset, text_emb, params = tiny_corpus
    root = tmp_path_factory.mktemp("runs")
    p = {**params, "train": {**params["train"], "epochs": 1}}
    train(dataset, text_emb, root / "multi", TrainConfig.from_params(p))
    train(dataset, text_emb, root / "en", TrainConfig.from_params(p), text_encoder="minilm-en")
    return root / "multi" / "model", root / "en" / "model"


def test_evaluate_reports_every_system_and_language(tiny_corpus, trained, tmp_path):
    dataset, text_emb, params = tiny_corpus
    config = EvaluateConfig.from_params(params)
    result = evaluate(dataset, text_emb, {TRAINED: trained[0], ENGLISH_ONLY: trained[1]}, tmp_path / "ev", config,
                      contrast=ENGLISH_ONLY)
    languages = {"en", "fr", "de", "es"}
    systems = ["chance", "untrained", TRAINED, ENGLISH_ONLY]
    assert result.systems == systems
    assert {(r["system"], r["language"]) for r in result.rows} == {(s, l) for s in systems for l in languages}
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(systems) <= set(metrics) and metrics["trained"]["en"]["t2a_R@1"] >= 0
    with open(tmp_path / "ev" / "per_language.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(systems) * len(languages)
    assert (tmp_path / "ev" / "r1_per_language.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "ev" / "paired_bootstrap.csv", encoding="utf-8") as fh:
        boot = list(csv.DictReader(fh))
    assert boot and all(float(b["ci_low"]) <= float(b["trained_minus_english_only_t2a_R@1"]) <= float(b["ci_high"])
                        for b in boot)
    assert metrics["checks"]["bootstrap_confidence"] == params["evaluate"]["bootstrap_confidence"]
    # chance with 4 clips: R@1 about 25 %, never 0 or 100 on average
    chance = [r for r in result.rows if r["system"] == "chance"]
    assert all(5 < r["t2a_R@1"] < 60 for r in chance)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cacara.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_embed_audio_contract_any_format_rate_and_channels(trained, tmp_path):
    model = str(trained[0])
    mono16 = write_tone(tmp_path / "a.wav", 1.0, 16000, freq=440)
    stereo48 = write_tone(tmp_path / "b.flac", 1.0, 48000, channels=2, freq=440)
    ogg = REPO / "tests" / "fixtures" / "audio" / "dog.ogg"
    out = tmp_path / "emb.npy"
    proc = _cli("embed-audio", "--model", model, "--out", str(out), str(mono16), str(stereo48), str(ogg), str(mono16))
    assert proc.returncode == 0, proc.stderr[-2000:]
    emb = np.load(out)
    assert emb.dtype == np.float32 and emb.shape == (4, 512)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(emb[0], emb[3]), "same file, same embedding"
    assert float(emb[0] @ emb[1]) > 0.95, "the same tone at 48 kHz stereo lands where it does at 16 kHz mono"
    # The CLI runs the model folder's ONNX export; the PyTorch modules give the same rows.
    from cacara.audio import decode
    from model.inference import TorchAudioEmbedder

    waves = [decode(f, 16000).samples for f in (mono16, stereo48, ogg, mono16)]
    reference = TorchAudioEmbedder(load_model(model)).embed(waves)
    assert float(np.abs(emb - reference).max()) < 5e-5
    alone = _cli("embed-audio", "--model", model, "--out", str(tmp_path / "dog.npy"), str(ogg))
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert float(np.abs(np.load(tmp_path / "dog.npy")[0] - emb[2]).max()) < 1e-5, "batch-mates change only rounding"


def test_embed_text_contract(trained, tmp_path):
    texts = tmp_path / "t.txt"
    texts.write_text("A dog barks.\nUn chien aboie.\n犬が吠える。\n", encoding="utf-8")
    out = tmp_path / "t.npy"
    proc = _cli("embed-text", "--model", str(trained[0]), "--out", str(out), "--file", str(texts))
    assert proc.returncode == 0, proc.stderr[-2000:]
    emb = np.load(out)
    assert emb.shape == (3, 512) and emb.dtype == np.float32
    proc = _cli("embed-text", "--model", str(trained[0]), "--out", str(tmp_path / "u.npy"), "A dog barks.")
    assert proc.returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "u.npy")[0], emb[0], atol=1e-6)
    # Queries are centred exactly as training and evaluation centred them, with the means saved in the model.
    model = load_model(trained[0])
    assert model.text_centroids.mode == "global" and (trained[0] / "text_centroids.npz").exists()
    raw = build_text_encoder(model.config["text_encoder"]).encode(["A dog barks.", "Un chien aboie.", "犬が吠える。"])
    np.testing.assert_allclose(emb, model.text_centroids.apply(np.asarray(raw, np.float32)), atol=1e-5)
    assert not np.allclose(emb, raw, atol=1e-3)
    proc = _cli("embed-text", "--model", str(trained[0]), "--out", str(tmp_path / "v.npy"), "--language", "fr",
                "Un chien aboie.")
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "v.npy")[0], emb[1], atol=1e-6)  # global mode: same mean


def test_cli_bad_inputs_fail_clearly(trained, tmp_path):
    corrupt = tmp_path / "bad.wav"
    corrupt.write_bytes(b"not audio at all" * 100)
    proc = _cli("embed-audio", "--model", str(trained[0]), "--out", str(tmp_path / "x.npy"), str(corrupt))
    assert proc.returncode != 0 and "undecodable" in proc.stderr and "bad.wav" in proc.stderr
    assert not (tmp_path / "x.npy").exists()
    proc = _cli("embed-audio", "--model", str(trained[0]), "--out", str(tmp_path / "x.npy"), str(tmp_path / "nope.wav"))
    assert proc.returncode != 0 and "nope.wav" in proc.stderr
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Caf\xe9 noise\n".encode("latin-1"))
    proc = _cli("embed-text", "--model", str(trained[0]), "--out", str(tmp_path / "y.npy"), "--file", str(latin1))
    assert proc.returncode != 0 and "UTF-8" in proc.stderr
    big = write_tone(tmp_path / "big.wav", 2.0, 16000)
    proc = _cli("embed-audio", "--model", str(trained[0]), "--set", "audio.max_file_bytes=10000",
                "--out", str(tmp_path / "x.npy"), str(big))
    assert proc.returncode != 0 and "too_large" in proc.stderr and "big.wav" in proc.stderr
    proc = _cli("embed-audio", "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "z.npy"), str(corrupt))
    assert proc.returncode != 0 and "not a CACARA model folder" in proc.stderr


def test_composite_tower_trains_and_queries_in_one_space(tiny_corpus, tmp_path, monkeypatch):
    """A composite tower is assembled from its towers' caches for training, and run live for queries:
    both must give the same (centred) rows, or the CLI would ask in a space the model never saw."""
    from components.embed_text import embed_text
    from model.text_cache import TextEmbeddingCache

    dataset, text_emb, params = tiny_corpus
    name = "use-multilingual+minilm-en*0.5"
    emb_dir = tmp_path / "text_emb"
    shutil.copytree(text_emb, emb_dir)
    p = {**params, "model": {**params["model"], "text_encoder": name}, "train": {**params["train"], "epochs": 1}}
    config = EmbedTextConfig.from_params(p)
    counts = embed_text(dataset, emb_dir, config, cache=emb_dir).counts
    assert counts["use-multilingual"][1] == counts["minilm-en"][1] == 0, "the towers' caches are reused"
    assert counts[name] == (counts["use-multilingual"][0], 0), "assembled from the caches, nothing embedded"
    # A rerun with everything cached loads no tower at all (e5 alone takes seconds to load).
    import model.text_encoders as text_encoders

    def refuse(*args, **kwargs):
        raise AssertionError("embed_text built a tower although every text was cached")

    monkeypatch.setattr(text_encoders, "build_text_encoder", refuse)
    first = TextEmbeddingCache(emb_dir, name)
    stale = TextEmbeddingCache(emb_dir, name)
    stale._emb = -stale._emb  # rows an older composite rule wrote: a rerun must not keep them
    stale.save()
    assert all(new == 0 for _, new in embed_text(dataset, emb_dir, config, cache=emb_dir).counts.values())
    monkeypatch.undo()
    texts = [c for clip in read_manifest(dataset) for caps in clip.captions.values() for c in caps]
    np.testing.assert_array_equal(TextEmbeddingCache(emb_dir, name).get(texts), first.get(texts))
    train(dataset, emb_dir, tmp_path / "m", TrainConfig.from_params(p))
    model = load_model(tmp_path / "m" / "model")
    assert model.config["text_encoder"] == name
    clip = read_manifest(dataset)[0]
    # Two captions the training cache holds, and a Cyrillic query the English tower cannot read.
    queries = [clip.captions["fr"][0], clip.captions["en"][0], "Корова."]
    proc = _cli("embed-text", "--model", str(tmp_path / "m" / "model"), "--out", str(tmp_path / "q.npy"), *queries)
    assert proc.returncode == 0, proc.stderr[-2000:]
    emb = np.load(tmp_path / "q.npy")
    assert emb.shape == (3, 512 + 384)
    cached = TextEmbeddingCache(emb_dir, name).get(queries[:2])
    np.testing.assert_allclose(emb[:2], model.text_centroids.apply(cached), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Centring kept the left-out block at zero: the Russian query is asked through USE alone.
    assert model.text_centroids.blocks == [512, 384]
    assert np.all(emb[2, 512:] == 0) and np.all(emb[:2, 512:] != 0)


def test_per_language_plot_does_not_depend_on_the_hash_seed(tmp_path):
    """Tied languages once kept a set's order, which changes with PYTHONHASHSEED: every `dvc repro`
    then drew a different PNG and dvc.lock changed with nothing else changed."""
    script = (
        "import sys; from pathlib import Path; from components.evaluate import _plot\n"
        "systems = ['chance', 'untrained', 'trained', 'trained_english_only']\n"
        "rows = [{'system': s, 'language': l, 't2a_R@1': v, 'n_texts': 10} for s in systems\n"
        "        for l, v in zip(['de', 'fr', 'es', 'it', 'ja', 'ko'], [20.0, 10.0, 20.0, 10.0, 20.0, 5.0])]\n"
        "_plot(rows, systems, Path(sys.argv[1]), 't2a_R@1', 10)\n")
    pngs = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"plot{seed}.png"
        proc = subprocess.run([sys.executable, "-c", script, str(out)], cwd=REPO, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr[-2000:]
        pngs.append(out.read_bytes())
    assert pngs[0][:4] == b"\x89PNG" and pngs[0] == pngs[1] == pngs[2]


def test_evaluate_scores_any_number_of_named_models_without_a_contrast(tiny_corpus, trained, tmp_path):
    """A production run trains one model: evaluate then has no contrast checks, and takes other names."""
    dataset, text_emb, params = tiny_corpus
    config = EvaluateConfig.from_params(params)
    result = evaluate(dataset, text_emb, {"candidate": trained[0]}, tmp_path / "one", config)
    assert result.systems == ["chance", "untrained", "candidate"]
    checks = json.loads((tmp_path / "one" / "metrics.json").read_text())["checks"]
    assert checks["model_under_test"] == "candidate" and "english_only_contrast" not in checks
    assert not (tmp_path / "one" / "paired_bootstrap.csv").exists()
    with pytest.raises(ValueError, match="contrast 'nope'"):
        evaluate(dataset, text_emb, {"candidate": trained[0]}, tmp_path / "x", config, contrast="nope")
    with pytest.raises(ValueError, match="unique and not"):
        evaluate(dataset, text_emb, {"untrained": trained[0]}, tmp_path / "x", config)


def test_per_language_plot_leaves_out_languages_with_few_captions(tmp_path):
    """Two languages with one test caption each once topped the chart at 100 %."""
    from components.evaluate import _plot

    systems = ["chance", "untrained", "trained"]
    rows = [{"system": s, "language": lang, "t2a_R@1": v, "n_texts": n} for s in systems
            for lang, v, n in (("de", 30.0, 29), ("xx", 100.0, 1), ("fr", 20.0, 29))]
    assert _plot(rows, systems, tmp_path / "p.png", "t2a_R@1", 10) == ["de", "fr"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
