"""The index and package steps on the model `packaged` trains on the demo corpus (tests/conftest.py):
re-indexing embeds only new clips, HNSW above the threshold, a tampered index is refused, the quality
gate stops a model that does not beat the untrained one (and stores nothing), and what is stored is
recorded by sha256."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cacara.config import IndexConfig, PackageConfig

pytestmark = pytest.mark.slow


def _subset(packaged, dest, n: int):
    from cacara.manifest import write_manifest

    clips = packaged.clips[:n]
    (dest / "audio").mkdir(parents=True)
    for clip in clips:
        shutil.copyfile(packaged.dataset / clip.audio_path, dest / clip.audio_path)
    write_manifest(clips, dest)
    return dest


def test_reindexing_a_grown_dataset_embeds_only_the_new_clips(packaged, tmp_path):
    from components.index import VECTORS, build_index

    config = IndexConfig.from_params(packaged.params)
    small = _subset(packaged, tmp_path / "small", 30)
    first = build_index(small, packaged.model_dir, tmp_path / "index", config)
    assert (first.count, first.embedded, first.reused) == (30, 30, 0)
    grown = build_index(packaged.dataset, packaged.model_dir, tmp_path / "index", config, previous=tmp_path / "index")
    assert (grown.count, grown.embedded, grown.reused) == (len(packaged.clips), len(packaged.clips) - 30, 30)
    full = np.load(packaged.index_dir / VECTORS)
    np.testing.assert_allclose(np.load(tmp_path / "index" / VECTORS), full, atol=1e-5)
    assert not (tmp_path / "index.staging").exists() and not (tmp_path / "index.old").exists()


def test_hnsw_above_the_threshold_finds_what_exact_search_finds(packaged, tmp_path):
    from components.index import VECTORS, ClipIndex, build_index

    config = IndexConfig.from_params(packaged.params)
    config = config.model_copy(update={"index": config.index.model_copy(update={"exact_below": 10})})
    result = build_index(packaged.dataset, packaged.model_dir, tmp_path / "hnsw", config, previous=packaged.index_dir)
    assert result.kind == "hnsw" and result.embedded == 0, "same model, same clips: every vector reused"
    hnsw, exact = ClipIndex(tmp_path / "hnsw"), ClipIndex(packaged.index_dir)
    from cacara.embed import Embedder

    # Text queries (an indexed vector would find itself first in any index): the top 5 agree in order.
    queries = Embedder.load(packaged.model_dir).embed_texts([c.captions["en"][0] for c in packaged.clips[:20]])
    assert [[row for row, _ in r] for r in hnsw.search(queries, 5)] == [[row for row, _ in r] for r in exact.search(queries, 5)]


def test_a_tampered_index_file_is_refused_by_name(packaged, tmp_path):
    from components.index import CLIPS, ClipIndex

    copy = tmp_path / "index"
    shutil.copytree(packaged.index_dir, copy)
    text = (copy / CLIPS).read_text(encoding="utf-8")
    (copy / CLIPS).write_text(text.replace("household-toilet", "household-toiler", 1), encoding="utf-8")
    with pytest.raises(ValueError, match=r"clips\.jsonl does not match its recorded sha256"):
        ClipIndex(copy)


def test_the_quality_gate_stops_a_model_no_better_than_untrained_and_stores_nothing(packaged, tmp_path):
    import bentoml

    from components.package import QualityGateFailed, package

    model = tmp_path / "model"
    shutil.copytree(packaged.model_dir, model)
    config = json.loads((model / "config.json").read_text())
    with (model / "history.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # every epoch as good as the untrained model
        row["val_score"] = rows[0]["val_score"]
    with (model / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    before = {str(m.tag) for m in bentoml.models.list()}
    with pytest.raises(QualityGateFailed) as info:
        package(model, packaged.index_dir, tmp_path / "out", PackageConfig.from_params(packaged.params))
    message = str(info.value)
    assert f"at epoch {config['epoch']}" in message and "a gain of 0.00 points" in message
    assert "package.min_val_gain 0.00" in message and "nothing was packaged" in message
    assert {str(m.tag) for m in bentoml.models.list()} == before
    assert not (tmp_path / "out" / "package.json").exists()


def test_the_gate_needs_the_history_to_judge(packaged, tmp_path):
    from components.package import QualityGateFailed, quality_gate

    model = tmp_path / "model"
    shutil.copytree(packaged.model_dir, model)
    (model / "history.csv").unlink()
    with pytest.raises(QualityGateFailed, match="has no history.csv"):
        quality_gate(model, PackageConfig.from_params(packaged.params))


def test_the_stored_model_records_every_file_and_its_provenance(packaged):
    import bentoml

    from model.weights_cache import sha256_file

    stored = bentoml.models.get(packaged.model_tag)
    root = stored.path_of("/")
    record = json.loads((packaged.package_dir / "package.json").read_text())
    assert record["model_tag"] == packaged.model_tag and record["bento_tag"] == packaged.bento_tag
    inner = json.loads(open(stored.path_of("package.json")).read())
    assert inner["sha256"] == record["sha256"]
    for rel, sha in record["sha256"].items():
        assert sha256_file(f"{root}/{rel}") == sha, rel
    assert {"model/audio_branch.onnx", "model/config.json", "index/index.faiss", "index/clips.jsonl"} <= set(record["sha256"])
    meta = stored.info.metadata
    assert meta["text_encoder"] == packaged.params["model"]["text_encoder"] and meta["index_size"] == len(packaged.clips)
    assert meta["quality_gate"]["passed"] and meta["serve"]["max_k"] == packaged.params["serve"]["max_k"]
    bento = bentoml.get(packaged.bento_tag)
    assert bento.info.entry_service == "cacara"
    assert {"cacara/service.py", "cacara/static/search.html", "requirements.txt"} <= {
        str(p.relative_to(bento.path_of("src"))) for p in __import__("pathlib").Path(bento.path_of("src")).rglob("*")}


def test_packaging_the_same_model_again_gives_the_same_tags_and_record(packaged, tmp_path):
    """Tags are hashes of what is stored, so `dvc repro` of an unchanged model leaves dvc.lock as it was."""
    from components.package import package

    again = package(packaged.model_dir, packaged.index_dir, tmp_path / "out", PackageConfig.from_params(packaged.params),
                    data_md5="0" * 32, drift_reference=packaged.drift_reference)
    assert (again.model_tag, again.bento_tag) == (packaged.model_tag, packaged.bento_tag)
    assert (tmp_path / "out" / "package.json").read_bytes() == (packaged.package_dir / "package.json").read_bytes()


def test_the_bento_serves_its_own_copy_of_the_code(packaged):
    """`bentoml serve` of the Bento imports the service from the Bento's src/, not from this checkout."""
    import os
    import subprocess
    import sys

    import bentoml

    src = bentoml.get(packaged.bento_tag).path_of("src")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import cacara.service as s; "
            "print(s.__file__); print(len(s._page_app().routes))")
    proc = subprocess.run([sys.executable, "-c", code, src], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CACARA_BENTO_MODEL": packaged.model_tag}, cwd="/")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0].startswith(src)


def test_the_drift_reference_travels_with_the_model_and_must_be_its_own(packaged, tmp_path):
    """Stored beside the model without its copy of the model (the stored model is that model); a
    reference another model made is refused before anything is stored."""
    import bentoml

    from components.package import DRIFT_REFERENCE, package

    stored = Path(bentoml.models.get(packaged.model_tag).path) / DRIFT_REFERENCE
    assert (stored / "profile.json").is_file() and (stored / "embeddings.npy").is_file()
    assert not (stored / "model").exists()
    other = tmp_path / "other_reference"
    shutil.copytree(packaged.drift_reference, other)
    record = json.loads((other / "profile.json").read_text())
    (other / "profile.json").write_text(json.dumps({**record, "model_sha256": "0" * 64}))
    before = {str(m.tag) for m in bentoml.models.list()}
    with pytest.raises(ValueError, match="made with another model"):
        package(packaged.model_dir, packaged.index_dir, tmp_path / "out", PackageConfig.from_params(packaged.params),
                data_md5="0" * 32, drift_reference=other)
    assert {str(m.tag) for m in bentoml.models.list()} == before
