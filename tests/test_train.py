"""train: learns, resumes exactly after an interruption, refuses a corrupt checkpoint, runs under DDP."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cacara.config import TrainConfig
from components.train import train
from model.cacara_model import load_model
from tests.conftest import REPO


def run(dataset, text_emb, out, params, resume: bool = True, **kwargs):
    """``train`` as ``dvc repro`` calls it: the run's own checkpoints folder handed back as resume_from."""
    resume_from = Path(out) / "checkpoints" if resume else None
    return train(dataset, text_emb, out, TrainConfig.from_params(params), resume_from=resume_from, **kwargs)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last.safetensors"))


def test_train_writes_model_history_and_checkpoint(tiny_corpus, tmp_path):
    dataset, text_emb, params = tiny_corpus
    result = run(dataset, text_emb, tmp_path / "run", params)
    assert result.epochs_run == 3 and [h["epoch"] for h in result.history] == [0, 1, 2, 3]
    assert all(h["train_loss"] > 0 for h in result.history[1:])
    model = load_model(tmp_path / "run" / "model")
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert config["text_encoder"] == "use-multilingual" and config["epoch"] == result.best_epoch
    assert model.config["out_dim"] == 512
    # The published model carries its ONNX export, recorded by sha256: what every CPU consumer runs.
    onnx_file = tmp_path / "run" / "model" / "audio_branch.onnx"
    assert config["onnx_sha256"] == hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    header = (tmp_path / "run" / "history.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,temperature")


def test_training_moves_the_weights_it_should_and_only_those(tiny_corpus, tmp_path):
    dataset, text_emb, params = tiny_corpus
    p = {**params, "train": {**params["train"], "trainable": "projection", "epochs": 1}}
    run(dataset, text_emb, tmp_path / "run", p)
    from model.cacara_model import build_model
    from model.text_cache import TextEmbeddingCache

    init = build_model(TrainConfig.from_params(p).model, p["train"]["seed"], "use-multilingual",
                       TextEmbeddingCache(text_emb, "use-multilingual")).state_dict()
    after = {k[len("model."):]: v for k, v in _weights(tmp_path / "run").items() if k.startswith("model.")}
    changed = {k for k in init if not torch.equal(init[k], after[k])}
    assert changed and all(k.startswith("head.") for k in changed)


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augmented"])
def test_resume_after_interruption_gives_the_same_weights(tiny_corpus, tmp_path, augment):
    """With augmentation on, the resumed run must also draw the very same gains and offsets."""
    dataset, text_emb, params = tiny_corpus
    if augment:
        params = {**params, "train": {**params["train"], "augment_gain_db": 6.0, "augment_shift_s": 0.3}}
    straight = run(dataset, text_emb, tmp_path / "straight", params)
    first = run(dataset, text_emb, tmp_path / "resumed", params, max_epochs_this_run=1)
    assert first.epochs_run == 1
    second = run(dataset, text_emb, tmp_path / "resumed", params)
    assert second.resumed_from == 1 and second.epochs_run == 2
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed run diverged from the uninterrupted one"
    assert [h["val_score"] for h in straight.history] == [h["val_score"] for h in second.history]


def test_resume_from_another_folder_continues_there(tiny_corpus, tmp_path):
    """A kfp task writes fresh output folders: the interrupted run's checkpoints come in as an input,
    and the new folder ends with the weights and history of an uninterrupted run."""
    dataset, text_emb, params = tiny_corpus
    straight = run(dataset, text_emb, tmp_path / "straight", params)
    run(dataset, text_emb, tmp_path / "first", params, max_epochs_this_run=1)
    config = TrainConfig.from_params(params)
    second = train(dataset, text_emb, tmp_path / "second", config, resume_from=tmp_path / "first" / "checkpoints")
    assert second.resumed_from == 1
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "second")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["val_score"] for h in straight.history] == [h["val_score"] for h in second.history]
    assert load_model(tmp_path / "second" / "model").config["text_encoder"] == "use-multilingual"
    fresh = train(dataset, text_emb, tmp_path / "first", config, max_epochs_this_run=1)
    assert fresh.resumed_from is None, "without resume_from the output folder is not read back"


def test_changed_settings_start_afresh_instead_of_resuming(tiny_corpus, tmp_path):
    dataset, text_emb, params = tiny_corpus
    run(dataset, text_emb, tmp_path / "run", params, max_epochs_this_run=1)
    other = {**params, "train": {**params["train"], "lr_head": 0.0005}}
    assert run(dataset, text_emb, tmp_path / "run", other, max_epochs_this_run=1).resumed_from is None


def test_changed_caption_rows_start_afresh_under_unchanged_settings(tiny_corpus, tmp_path):
    """Same params, same code, same manifest, but the cached caption rows differ (a re-assembled
    composite tower, say): the old checkpoint was trained on other targets and must not be resumed."""
    import shutil

    import numpy as np

    from model.text_cache import TextEmbeddingCache

    dataset, text_emb, params = tiny_corpus
    emb = tmp_path / "text_emb"
    shutil.copytree(text_emb, emb)
    run(dataset, emb, tmp_path / "run", params, max_epochs_this_run=1)
    assert run(dataset, emb, tmp_path / "run", params, max_epochs_this_run=1).resumed_from == 1
    cache = TextEmbeddingCache(emb, params["model"]["text_encoder"])
    cache._emb = np.roll(cache._emb, 1, axis=1)  # every row changed, still unit length
    cache.save()
    assert run(dataset, emb, tmp_path / "run", params, max_epochs_this_run=1).resumed_from is None


def test_corrupt_checkpoint_is_refused(tiny_corpus, tmp_path):
    dataset, text_emb, params = tiny_corpus
    run(dataset, text_emb, tmp_path / "run", params, max_epochs_this_run=1)
    ckpt = tmp_path / "run" / "checkpoints" / "last.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match="corrupt"):
        run(dataset, text_emb, tmp_path / "run", params)


def test_negative_augmentation_range_fails_before_training(tiny_corpus, tmp_path):
    dataset, text_emb, params = tiny_corpus
    bad = {**params, "train": {**params["train"], "augment_gain_db": -3.0}}
    with pytest.raises(ValueError, match="train.augment_gain_db: Input should be greater than or equal to 0"):
        run(dataset, text_emb, tmp_path / "run", bad)
    assert not (tmp_path / "run").exists()


def test_missing_caption_embeddings_fail_before_training(tiny_corpus, tmp_path):
    dataset, _, params = tiny_corpus
    with pytest.raises(KeyError, match="embed"):
        run(dataset, tmp_path / "empty_cache", tmp_path / "run", params)


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_gloo(tiny_corpus, tmp_path):
    """torchrun with 2 processes on the gloo backend: the multi-GPU path, exercised on CPU."""
    dataset, text_emb, _ = tiny_corpus
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "cacara.cli", "train", "--dataset", str(dataset), "--text-emb", str(text_emb),
           "--out", str(tmp_path / "ddp"), "--set", "model.text_encoder=use-multilingual",
           "--set", "train.epochs=2", "--set", "train.batch_size=2", "--set", "train.warmup_epochs=1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = (tmp_path / "ddp" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # header + epochs 0..2, written once (by rank 0)
    assert load_model(tmp_path / "ddp" / "model").config["text_encoder"] == "use-multilingual"


def test_rerun_of_a_finished_run_republishes_its_outputs(tiny_corpus, tmp_path):
    """dvc deletes non-persistent outputs before rerunning a stage: a finished run must restore them."""
    import shutil

    dataset, text_emb, params = tiny_corpus
    first = run(dataset, text_emb, tmp_path / "run", params)
    shutil.rmtree(tmp_path / "run" / "model")
    (tmp_path / "run" / "history.csv").unlink()
    again = run(dataset, text_emb, tmp_path / "run", params)
    assert again.epochs_run == 0 and again.best_epoch == first.best_epoch
    assert load_model(tmp_path / "run" / "model") is not None
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 1 + len(first.history)


def test_init_anchor_keeps_the_head_near_its_initialisation(tiny_corpus, tmp_path):
    dataset, text_emb, params = tiny_corpus

    def drift(anchor: float) -> float:
        p = {**params, "train": {**params["train"], "trainable": "projection", "epochs": 2, "init_anchor": anchor}}
        run(dataset, text_emb, tmp_path / f"a{anchor}", p)
        from model.cacara_model import build_model
        from model.text_cache import TextEmbeddingCache

        init = build_model(TrainConfig.from_params(p).model, p["train"]["seed"], "use-multilingual",
                           TextEmbeddingCache(text_emb, "use-multilingual")).state_dict()
        after = _weights(tmp_path / f"a{anchor}")
        return sum(float(((after[f"model.{k}"] - v) ** 2).sum()) for k, v in init.items() if k.startswith("head."))

    assert drift(1000.0) < drift(0.0)


def test_unreadable_training_audio_names_the_clip(tiny_corpus, tmp_path):
    import shutil

    from cacara.audio import AudioError
    from cacara.manifest import read_manifest

    dataset, text_emb, params = tiny_corpus
    broken = tmp_path / "ds"
    shutil.copytree(dataset, broken)
    victim = next(c for c in read_manifest(broken) if c.split == "train")
    (broken / victim.audio_path).write_bytes(b"not audio" * 50)
    with pytest.raises(AudioError, match=victim.clip_id):
        run(broken, text_emb, tmp_path / "run", params)


def test_bf16_autocast_path_trains_on_cpu(tiny_corpus, tmp_path):
    """train.precision=bf16 takes the autocast path CUDA runs by default (auto); CPU bf16 proves that
    path end to end here: it learns, and what it saves is float32."""
    from components.train import _autocast

    dataset, text_emb, params = tiny_corpus
    cpu = torch.device("cpu")
    for precision, expect in [("fp32", False), ("auto", False), ("bf16", True)]:
        settings = TrainConfig.from_params({**params, "train": {**params["train"], "precision": precision}}).train
        with _autocast(settings, cpu):
            assert torch.is_autocast_enabled("cpu") is expect
    p = {**params, "train": {**params["train"], "precision": "bf16", "epochs": 2}}
    result = run(dataset, text_emb, tmp_path / "run", p)
    assert all(0 < h["train_loss"] < float("inf") for h in result.history[1:])
    weights = _weights(tmp_path / "run")
    assert all(t.dtype == torch.float32 for t in weights.values() if t.is_floating_point())
    model = load_model(tmp_path / "run" / "model")
    assert next(model.parameters()).dtype == torch.float32
