"""What each Kubeflow task runs: its parameters and artifacts in, the step function, artifacts out.

The kfp components (components/kfp_components.py) are thin: their bodies hand ``locals()`` to one of
these functions, which builds the step's typed config from the flat parameters, calls the same step
function ``dvc repro`` runs, and writes outputs and metadata (data hash, towers, metrics) onto the
artifacts. Artifacts are used through their ``path`` and ``metadata`` only, so nothing here imports
kfp (inside a running component kfp exposes only its runtime types).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from cacara.config import (DriftConfig, DriftProfileConfig, EmbedTextConfig, EvaluateConfig, IndexConfig,
                           IngestConfig, PackageConfig, TrainConfig, ValidateConfig)

log = logging.getLogger(__name__)

#: Where the train task mounts the ReadWriteMany volume it shares with TrainJob nodes.
SHARED_MOUNT = "/shared"


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def _copy_dir(src: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest)


def shard_indices(num_shards: int) -> list[int]:
    if num_shards < 1:
        raise ValueError(f"ingest needs at least one shard, got {num_shards}")
    return list(range(num_shards))


def ingest_task(values: dict[str, Any]) -> None:
    """One shard of the source into the ``dataset`` artifact; the merge task gates on the bad fraction."""
    from components.ingest import ingest

    _setup_logging()
    dataset = values["dataset"]
    result = ingest(values["source_uri"], dataset.path, IngestConfig.from_leaves(values),
                    shard=int(values["shard"]), num_shards=int(values["num_shards"]))
    dataset.metadata.update({"data_md5": values["data_md5"], "shard": int(values["shard"]),
                             "num_shards": int(values["num_shards"]), "clips": len(result.clips),
                             "quarantined": len(result.quarantined)})


def merge_task(values: dict[str, Any]) -> None:
    from components.ingest import merge_shards

    _setup_logging()
    dataset, parts = values["dataset"], values["shards"]
    result = merge_shards([Path(p.path) for p in parts], dataset.path, IngestConfig.from_leaves(values))
    dataset.metadata.update({"data_md5": values["data_md5"], "format": result.format, "clips": len(result.clips),
                             "quarantined": len(result.quarantined), "rows": result.total_rows,
                             "bad_fraction": round(result.bad_fraction, 6)})


def validate_task(values: dict[str, Any]) -> None:
    """Great Expectations over the dataset; a failed critical check fails the task with its message,
    after the reports are written."""
    from components.validate import ValidationFailed, validate

    _setup_logging()
    reports, report = values["reports"], values["report"]
    try:
        result = validate(values["dataset"].path, reports.path, ValidateConfig.from_leaves(values))
    except ValidationFailed:
        shutil.copyfile(Path(reports.path) / "validation.html", report.path)
        raise
    shutil.copyfile(result.html_path, report.path)
    reports.metadata.update({"success": result.success, "clips": result.n_clips, "captions": result.n_captions,
                             "warnings": [e.name for e in result.failed("warning")]})


def embed_text_task(values: dict[str, Any]) -> None:
    from components.embed_text import embed_text

    _setup_logging()
    text_emb = values["text_emb"]
    result = embed_text(values["dataset"].path, text_emb.path, EmbedTextConfig.from_leaves(values))
    text_emb.metadata.update({"towers": sorted(result.counts), "texts": {k: v[0] for k, v in result.counts.items()}})


def train_task(values: dict[str, Any]) -> None:
    """Train on one node (several GPUs through torchrun) or, with ``train_nodes`` > 1, through a
    Kubeflow Trainer TrainJob; either way the selected model becomes the ``model`` artifact."""
    _setup_logging()
    config = TrainConfig.from_leaves(values)
    tower = values.get("text_encoder") or config.model.text_encoder
    nodes, gpus = int(values["train_nodes"]), int(values["train_gpus"])
    _check_gpus(int(values.get("pod_gpus", 0)), config.train.device)
    dataset, text_emb = Path(values["dataset"].path), Path(values["text_emb"].path)
    scratch = Path(tempfile.mkdtemp(prefix="cacara-train-"))
    if nodes > 1:
        out = _train_on_trainjob(values, config, tower, dataset, text_emb)
        try:
            _publish_model(out, values["model"], values["metrics"], values["data_md5"])
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)  # the run's folder on the shared volume
        return
    elif gpus > 1:
        out = scratch / "out"
        config_file = scratch / "train_config.json"
        config_file.write_text(config.model_dump_json())
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
               "-m", "cacara.cli", "train", "--config", str(config_file), "--dataset", str(dataset),
               "--text-emb", str(text_emb), "--out", str(out), "--text-encoder", tower]
        log.info("training on %d GPUs of this node: %s", gpus, " ".join(cmd))
        subprocess.run(cmd, check=True)
    else:
        from components.train import train

        out = scratch / "out"
        train(dataset, text_emb, out, config, text_encoder=tower)
    _publish_model(out, values["model"], values["metrics"], values["data_md5"])


def _check_gpus(requested: int, device: str) -> None:
    """A pod granted fewer GPUs than it asked for would train on what it sees, or on the CPU: say so."""
    if requested <= 0 or device == "cpu":
        return
    import torch

    visible = torch.cuda.device_count()
    if visible < requested:
        message = f"the train task requested {requested} GPU(s) but sees {visible}"
        if device == "cuda":
            raise RuntimeError(message + " (train.device is cuda)")
        log.warning("%s; training on what is visible", message)


def _train_on_trainjob(values: dict[str, Any], config: TrainConfig, tower: str, dataset: Path,
                       text_emb: Path) -> Path:
    from components.trainjob import TrainJobSpec, submit_and_wait, trainjob_body

    if not values["cluster_shared_pvc"]:
        raise ValueError("train_nodes > 1 needs cluster.shared_pvc: a ReadWriteMany volume the task and the "
                         "TrainJob nodes share")
    run = f"cacara-{uuid.uuid4().hex[:10]}"
    shared = Path(os.environ.get("CACARA_SHARED_DIR", SHARED_MOUNT)) / run
    _copy_dir(dataset, shared / "dataset")
    _copy_dir(text_emb, shared / "text_emb")
    (shared / "train_config.json").write_text(config.model_dump_json())
    mount = SHARED_MOUNT + "/" + run
    command = ["torchrun", "-m", "cacara.cli", "train", "--config", f"{mount}/train_config.json",
               "--dataset", f"{mount}/dataset", "--text-emb", f"{mount}/text_emb", "--out", f"{mount}/out",
               "--text-encoder", tower]
    spec = TrainJobSpec(
        name=run, namespace=values["cluster_namespace"], image=values["cluster_cuda_image"], command=command,
        num_nodes=int(values["train_nodes"]), gpus_per_node=int(values["train_gpus"]),
        cpu=values["cluster_train_cpu"], memory=values["cluster_train_memory"], runtime=values["cluster_trainer_runtime"],
        node_selector=values["cluster_gpu_node_selector"] or {}, tolerations=values["cluster_gpu_tolerations"] or [],
        pvc=values["cluster_shared_pvc"], mount_path=SHARED_MOUNT,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        deadline_s=int(values["cluster_trainjob_timeout_s"]))  # Trainer stops the nodes even if this pod dies
    submit_and_wait(trainjob_body(spec), timeout_s=float(values["cluster_trainjob_timeout_s"]))
    return shared / "out"


def _publish_model(out: Path, model, metrics, data_md5: str) -> None:
    _copy_dir(out / "model", Path(model.path))
    config = json.loads((out / "model" / "config.json").read_text())
    val = config.get("val", {})
    model.metadata.update({"text_encoder": config["text_encoder"], "audio_encoder": config["audio_encoder"],
                           "best_epoch": config.get("epoch"), "data_md5": data_md5,
                           "onnx_sha256": config.get("onnx_sha256"), "weights_sha256": config["sha256"]})
    for name in ("t2a_R@1", "a2t_R@1", "t2a_R@5"):
        if name in val:
            metrics.log_metric(f"val_en_{name}", round(float(val[name]), 3))


def evaluate_task(values: dict[str, Any]) -> None:
    """Every system on the test split; the metrics, an HTML report and a Markdown summary as artifacts."""
    from components.evaluate import ENGLISH_ONLY, TRAINED, evaluate

    _setup_logging()
    config = EvaluateConfig.from_leaves(values)
    models = {TRAINED: Path(values["model"].path)}
    contrast = None
    if values.get("english_only_model") is not None:
        models[ENGLISH_ONLY] = Path(values["english_only_model"].path)
        contrast = ENGLISH_ONLY
    reports = Path(values["reports"].path)
    result = evaluate(values["dataset"].path, values["text_emb"].path, models, reports, config, contrast=contrast)
    shutil.copyfile(reports / "report.html", values["report"].path)
    Path(values["summary"].path).write_text(result.markdown(), encoding="utf-8")
    metrics, lang = values["metrics"], config.training_language
    for system in result.systems:
        block = result.summary_metrics.get(system) or {}
        if block.get(lang):
            metrics.log_metric(f"{system}_{lang}_t2a_R@1", block[lang]["t2a_R@1"])
        if block.get("mean_other_languages"):
            metrics.log_metric(f"{system}_other_languages_t2a_R@1", block["mean_other_languages"]["t2a_R@1"])
    checks = result.summary_metrics["checks"]
    for key in ("known_languages_where_multilingual_beats_english_only_t2a_R@1", "other_languages_known_to_tower"):
        if key in checks:
            metrics.log_metric(key, checks[key])
    values["reports"].metadata.update({"data_md5": values["data_md5"], "systems": result.systems,
                                       "checks": {k: v for k, v in checks.items() if not isinstance(v, list)}})


def drift_profile_task(values: dict[str, Any]) -> None:
    """The trained model's drift reference (its training clips' features and embeddings, and the model)."""
    from components.drift import profile_reference

    _setup_logging()
    out = values["drift_reference"]
    record = profile_reference(values["dataset"].path, values["model"].path, out.path,
                               DriftProfileConfig.from_leaves(values))
    out.metadata.update({"clips": record["clips"], "model_sha256": record["model_sha256"],
                         "data_md5": values["data_md5"]})


def drift_check_task(values: dict[str, Any]) -> None:
    """The new dataset against the reference of the model in production (``reference_uri``: a local
    folder or an fsspec URL of a drift-profile output). No reference: nothing to compare, said so in the
    summary. A failed gate (policy fail) fails the task after the report is written: nothing trains."""
    from components.drift import DriftGateFailed, REPORT_HTML, SUMMARY_JSON, check_drift, format_summary

    _setup_logging()
    reports, report = values["reports"], values["report"]
    Path(reports.path).mkdir(parents=True, exist_ok=True)
    uri = str(values["reference_uri"] or "").strip()
    if not uri:
        summary = {"skipped": "no drift reference given (reference_uri): nothing to compare with"}
        (Path(reports.path) / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
        Path(report.path).write_text("<html><body><p>No drift reference was given: nothing to compare with."
                                     "</p></body></html>", encoding="utf-8")
        reports.metadata.update({"skipped": True, "data_md5": values["data_md5"]})
        log.info("drift: %s", summary["skipped"])
        return
    reference, copied = _local_copy(uri)
    try:
        summary = check_drift(reference, values["dataset"].path, reports.path, DriftConfig.from_leaves(values))
    except DriftGateFailed as exc:
        summary = exc.summary
        log.error("%s", format_summary(summary))
        raise
    finally:
        html = Path(reports.path) / REPORT_HTML
        if html.exists():
            shutil.copyfile(html, report.path)
        if copied:
            shutil.rmtree(reference, ignore_errors=True)
    log.info("%s", format_summary(summary))
    reports.metadata.update({"passed": summary["passed"], "drifted": summary["drifted"],
                             "data_md5": values["data_md5"]})


def _local_copy(uri: str) -> tuple[Path, bool]:
    """A folder on this machine holding what ``uri`` names, and whether it is a copy to remove (a local
    path is used in place)."""
    if "://" not in uri:
        return Path(uri), False
    import fsspec

    target = Path(tempfile.mkdtemp(prefix="cacara-reference-"))
    fs, path = fsspec.core.url_to_fs(uri)
    fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    return target, True


def package_task(values: dict[str, Any]) -> None:
    """The index of the dataset, then the quality gate and the Bento; the model store lives in the task's
    own folder (a pod's disk goes with it), so what leaves the task is the ``bento`` artifact: the model
    store entry and the Bento as archives that `bentoml models import` / `bentoml import` take from
    object storage, with package.json (tags, gate, sha256) beside them."""
    _setup_logging()
    store = Path(tempfile.mkdtemp(prefix="cacara-bentoml-"))
    os.environ["BENTOML_HOME"] = str(store)  # before bentoml is imported: it reads its home once
    from components.index import build_index
    from components.package import package

    index, bento = values["index"], values["bento"]
    try:
        built = build_index(values["dataset"].path, values["model"].path, index.path, IndexConfig.from_leaves(values))
        index.metadata.update({"clips": built.count, "kind": built.kind, "data_md5": values["data_md5"]})
        metrics = Path(values["reports"].path) / "metrics.json"
        result = package(values["model"].path, index.path, bento.path, PackageConfig.from_leaves(values),
                         metrics=metrics if metrics.exists() else None, data_md5=values["data_md5"],
                         export=True, drift_reference=values["drift_reference"].path)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    bento.metadata.update({"model_tag": result.model_tag, "bento_tag": result.bento_tag, "data_md5": values["data_md5"],
                           "gain": round(result.gate["gain"], 3), "untrained": round(result.gate["untrained"], 3),
                           "selected": round(result.gate["selected"], 3)})
