"""The training pipeline: ingest (sharded) -> validate -> drift -> embed_text -> train -> evaluate -> package, on Kubeflow.

Its parameters mirror params.yaml: one per value a step reads (``train_epochs`` is ``train.epochs``),
built from the typed configs (cacara/config.py), with params.yaml's values as defaults; plus the
run's own: the source URI, the dataset's DVC md5 (kfp's cache key sees parameter values, not artifact
contents, so new data must change a parameter to rerun the steps), the shard count, and the training
nodes and GPUs. How the tasks run (images, GPU pool, retries, the storage Secret) comes from the
``cluster`` section when the pipeline is compiled.

    cacara pipeline compile                      # pipelines/training.yaml, kept in the repo
    cacara pipeline run-local                    # the whole pipeline in kfp.local on the demo corpus
    cacara pipeline submit --host https://...    # a run on a Kubeflow Pipelines cluster
"""

from __future__ import annotations

import inspect
import typing
from pathlib import Path
from typing import Any, Mapping

from cacara.config import (STEP_CONFIGS, ClusterSection, DriftConfig, DriftProfileConfig, EmbedTextConfig,
                           EvaluateConfig, IndexConfig, IngestConfig, PackageConfig, TrainConfig, ValidateConfig,
                           flat_params, validate_params)

PIPELINE_NAME = "cacara-training"
COMPILED = Path(__file__).resolve().parent / "training.yaml"
GPU = "nvidia.com/gpu"


def data_md5(dvc_file: str | Path) -> str:
    """The md5 DVC records for a tracked dataset (``data.dvc``): what keys kfp's cache to the data."""
    import yaml

    record = yaml.safe_load(Path(dvc_file).read_text(encoding="utf-8"))
    outs = record.get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise ValueError(f"{dvc_file} records no md5 (is it a .dvc file?)")
    return str(outs[0]["md5"])


def _kfp_type(annotation: Any) -> type:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return type(typing.get_args(annotation)[0])
    if origin in (list, dict):
        return origin
    return annotation


def parameter_types() -> dict[str, type]:
    """Every step-setting parameter of the pipeline with its kfp type."""
    out: dict[str, type] = {}
    for config in STEP_CONFIGS.values():
        for leaf, (field, sub) in config.leaves().items():
            annotation = config.model_fields[field].annotation
            if sub is not None:
                annotation = annotation.model_fields[sub].annotation
            out[leaf] = _kfp_type(annotation)
    return out


def run_parameters(params: Mapping[str, Any], md5: str = "") -> dict[str, tuple[type, Any]]:
    """The run's own parameters (not step settings), with their defaults."""
    cluster = validate_params(params).cluster
    return {"source_uri": (str, params["data"]["source"]), "data_md5": (str, md5), "drift_reference_uri": (str, ""),
            "ingest_shards": (int, cluster.ingest_shards), "train_nodes": (int, cluster.train_nodes),
            "train_gpus": (int, cluster.train_gpus)}


def pipeline_defaults(params: Mapping[str, Any], md5: str = "") -> dict[str, Any]:
    """Every pipeline parameter's value for ``params``: what `submit` sends and the compiled defaults."""
    return {**{k: v for k, (_, v) in run_parameters(params, md5).items()}, **flat_params(params)}


def build_pipeline(params: Mapping[str, Any], md5: str = ""):
    """The kfp pipeline for ``params``: its signature is generated from the typed configs, so it cannot
    drift from params.yaml (kfp reads a pipeline's parameters from its signature)."""
    from kfp import dsl

    cluster = validate_params(params).cluster
    types = {**{k: t for k, (t, _) in run_parameters(params, md5).items()}, **parameter_types()}
    defaults = pipeline_defaults(params, md5)
    names = list(types)

    def body(*args: Any) -> None:
        _graph(dict(zip(names, args)), cluster)

    body.__signature__ = inspect.Signature([
        inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[n], annotation=types[n])
        for n in names])
    body.__name__ = body.__qualname__ = PIPELINE_NAME.replace("-", "_")
    return dsl.pipeline(name=PIPELINE_NAME, description=(
        "CACARA: the audio branch trained on English captions against a frozen multilingual text tower; "
        "ingest, validate, caption embedding, training (GPU, multi-node via Kubeflow Trainer), "
        "multilingual evaluation, and packaging for BentoML behind a quality gate."))(body)


def _settings(values: Mapping[str, Any], config) -> dict[str, Any]:
    return {leaf: values[leaf] for leaf in config.leaves()}


def _cpu_task(task, cluster: ClusterSection):
    task.set_cpu_request(cluster.task_cpu).set_cpu_limit(cluster.task_cpu)
    task.set_memory_request(cluster.task_memory).set_memory_limit(cluster.task_memory)
    return task


def _reads_remote_storage(task, cluster: ClusterSection):
    """Retries with exponential backoff, and the storage credentials from a Secret (never in the YAML)."""
    from kfp import kubernetes

    task.set_retry(num_retries=cluster.retries, backoff_duration=cluster.retry_backoff, backoff_factor=2.0,
                   backoff_max_duration="3600s")
    if cluster.storage_secret and cluster.storage_secret_keys:
        kubernetes.use_secret_as_env(task, secret_name=cluster.storage_secret,
                                     secret_key_to_env={k: k for k in cluster.storage_secret_keys}, optional=True)
    return task


def _train(values: Mapping[str, Any], cluster: ClusterSection, dataset, text_emb, tower, gpus):
    """One training task on the GPU pool. ``gpus`` (a task output) is what its pod requests: the GPUs it
    trains on, or 0 when it only launches a multi-node TrainJob, whose nodes hold the GPUs."""
    from kfp import kubernetes

    task = _components(cluster).train(dataset=dataset, text_emb=text_emb, data_md5=values["data_md5"], text_encoder=tower,
                 train_nodes=values["train_nodes"], train_gpus=values["train_gpus"], pod_gpus=gpus,
                 cluster_namespace=cluster.namespace, cluster_cuda_image=cluster.cuda_image,
                 cluster_train_cpu=cluster.train_cpu, cluster_train_memory=cluster.train_memory,
                 cluster_trainer_runtime=cluster.trainer_runtime,
                 cluster_gpu_node_selector=dict(cluster.gpu_node_selector),
                 cluster_gpu_tolerations=[t.model_dump(exclude_none=True) for t in cluster.gpu_tolerations],
                 cluster_shared_pvc=cluster.shared_pvc, cluster_trainjob_timeout_s=cluster.trainjob_timeout_s,
                 **_settings(values, TrainConfig))
    task.set_accelerator_type(GPU).set_accelerator_limit(gpus)
    task.set_cpu_request(cluster.train_cpu).set_cpu_limit(cluster.train_cpu)
    task.set_memory_request(cluster.train_memory).set_memory_limit(cluster.train_memory)
    for key, value in cluster.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for t in cluster.gpu_tolerations:
        kubernetes.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    if cluster.shared_pvc:
        kubernetes.mount_pvc(task, pvc_name=cluster.shared_pvc, mount_path="/shared")
    return task


def _components(cluster: ClusterSection):
    from components import kfp_components

    return kfp_components.build(cluster.image, cluster.cuda_image)


def _graph(values: Mapping[str, Any], cluster: ClusterSection) -> None:
    from kfp import dsl

    c = _components(cluster)
    md5 = values["data_md5"]
    shards = _cpu_task(c.shard_indices(num_shards=values["ingest_shards"]), cluster)
    with dsl.ParallelFor(shards.output, name="ingest-shards") as shard:
        part = c.ingest_shard(source_uri=values["source_uri"], data_md5=md5, shard=shard,
                              num_shards=values["ingest_shards"], **_settings(values, IngestConfig))
        _reads_remote_storage(_cpu_task(part, cluster), cluster)
    merged = _cpu_task(c.merge_shards(shards=dsl.Collected(part.outputs["dataset"]), data_md5=md5,
                                      **_settings(values, IngestConfig)), cluster)
    dataset = merged.outputs["dataset"]
    validated = _cpu_task(c.validate_dataset(dataset=dataset, data_md5=md5, **_settings(values, ValidateConfig)),
                          cluster)
    drift = _cpu_task(c.check_drift(dataset=dataset, data_md5=md5, reference_uri=values["drift_reference_uri"],
                                    **_settings(values, DriftConfig)), cluster)
    _reads_remote_storage(drift, cluster)  # the reference lives in object storage
    drift.set_caching_options(False)  # the cache key sees the reference's URI, not what is there now
    drift.after(validated)
    texts = _cpu_task(c.embed_text(dataset=dataset, data_md5=md5, **_settings(values, EmbedTextConfig)), cluster)
    texts.after(validated, drift)  # nothing trains on data that failed validation or drifted
    text_emb = texts.outputs["text_emb"]
    gpus = _cpu_task(c.launcher_gpus(train_nodes=values["train_nodes"], train_gpus=values["train_gpus"]), cluster)
    model = _train(values, cluster, dataset, text_emb, "", gpus.output).outputs["model"]
    reference = _cpu_task(c.drift_profile(dataset=dataset, model=model, data_md5=md5,
                                          **_settings(values, DriftProfileConfig)), cluster).outputs["drift_reference"]
    common = dict(dataset=dataset, text_emb=text_emb, data_md5=md5, **_settings(values, EvaluateConfig))
    with dsl.If(values["evaluate_english_only_contrast"] == True, name="with-english-only-contrast"):  # noqa: E712
        english = _train(values, cluster, dataset, text_emb, values["evaluate_english_only_text_encoder"],
                         gpus.output).set_display_name("train-english-only")
        evaluated = _cpu_task(c.evaluate(model=model, english_only_model=english.outputs["model"], **common), cluster)
        _package(values, cluster, dataset, model, evaluated, reference)
    with dsl.Else(name="without-contrast"):
        evaluated = _cpu_task(c.evaluate(model=model, **common), cluster)
        _package(values, cluster, dataset, model, evaluated, reference)


def _package(values: Mapping[str, Any], cluster: ClusterSection, dataset, model, evaluated, reference) -> None:
    """After evaluation, with its metrics; the quality gate decides whether anything is packaged. (One
    call per branch: kfp.local cannot resolve a ``dsl.OneOf`` of the branches' outputs.)"""
    _cpu_task(_components(cluster).package_model(
        dataset=dataset, model=model, reports=evaluated.outputs["reports"], drift_reference=reference,
        data_md5=values["data_md5"],
        **_settings(values, IndexConfig), **_settings(values, PackageConfig)), cluster)


def compile_pipeline(params: Mapping[str, Any], out: str | Path = COMPILED, md5: str = "") -> Path:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(params, md5), str(out))
    return Path(out)


def run_local(params: Mapping[str, Any], pipeline_root: str | Path, source: str | Path, md5: str = "",
              **overrides: Any):
    """The whole pipeline in kfp.local with the SubprocessRunner in this environment (no venv per task,
    no containers); resources, accelerators, retries and caching are cluster matters kfp.local ignores."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    arguments = {**pipeline_defaults(params, md5), "source_uri": str(Path(source).resolve()), **overrides}
    return build_pipeline(params, md5)(**arguments)
