"""The kfp v2 components: one per pipeline step, each a thin shell over the step function dvc runs.

Every component is a lightweight Python component whose ``base_image`` is the project's own image
(``cluster.image`` or, for training, ``cluster.cuda_image``, given to :func:`build` when the pipeline is
compiled): the same definitions run in ``kfp.local`` here (the SubprocessRunner executes the body in
this environment) and on a cluster. A
body hands its ``locals()`` to components/tasks.py, which builds the step's typed config from the flat
parameters: a component's parameters are exactly its step's settings (tests/test_kfp_components.py
checks them against cacara/config.py) plus its artifacts and the dataset's DVC md5, which keys kfp's
cache to the data (the cache sees parameter values, not artifact contents).

This module imports kfp at import time; the modules its bodies import (components.tasks and the step
modules) never do, since inside a running component kfp exposes only its runtime types.
"""

# No `from __future__ import annotations`: kfp reads the annotations as types, not strings.
from typing import List, Optional

from types import SimpleNamespace

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def shard_indices(num_shards: int) -> List[int]:
    """0 .. num_shards - 1: what ingest fans out over."""
    from components.tasks import shard_indices as indices

    return indices(num_shards)


def launcher_gpus(train_nodes: int, train_gpus: int) -> int:
    """GPUs the train task's own pod requests: its GPUs on one node, none when it only launches a
    multi-node TrainJob (the TrainJob's nodes request theirs)."""
    return train_gpus if train_nodes == 1 else 0


def ingest_shard(
    dataset: Output[Dataset], source_uri: str, data_md5: str, shard: int, num_shards: int,
    data_format: str, audio_sample_rate: int, audio_min_duration_s: float, audio_max_duration_s: float,
    audio_max_file_bytes: int, audio_silence_rms_dbfs: float, split_seed: int, split_train: float,
    split_val: float, split_test: float, ingest_max_bad_fraction: float, ingest_training_language: str,
    ingest_audio_format: str, ingest_allowed_roots: list,
):
    """One shard of the source (rows whose clip id hashes to it) as a canonical dataset."""
    from components.tasks import ingest_task

    ingest_task(dict(locals()))


def merge_shards(
    shards: Input[List[Dataset]], dataset: Output[Dataset], data_md5: str,
    data_format: str, audio_sample_rate: int, audio_min_duration_s: float, audio_max_duration_s: float,
    audio_max_file_bytes: int, audio_silence_rms_dbfs: float, split_seed: int, split_train: float,
    split_val: float, split_test: float, ingest_max_bad_fraction: float, ingest_training_language: str,
    ingest_audio_format: str, ingest_allowed_roots: list,
):
    """The shards as one dataset; fails when more than ingest.max_bad_fraction of all rows are bad."""
    from components.tasks import merge_task

    merge_task(dict(locals()))


def validate_dataset(
    dataset: Input[Dataset], reports: Output[Artifact], report: Output[HTML], data_md5: str,
    validate_caption_min_chars: int, validate_caption_max_chars: int, validate_min_rms_dbfs: float,
    validate_max_clipping_ratio: float, validate_clip_level: float, validate_split_tolerance: float,
    validate_language_min_words: int, validate_language_max_other_confidence: float, validate_critical: list,
    validate_warning: list, audio_sample_rate: int, audio_min_duration_s: float, audio_max_duration_s: float,
    audio_max_file_bytes: int, audio_silence_rms_dbfs: float, split_seed: int, split_train: float,
    split_val: float, split_test: float, ingest_training_language: str,
):
    """Great Expectations over the dataset; a failed critical check stops the run with its message."""
    from components.tasks import validate_task

    validate_task(dict(locals()))


def embed_text(
    dataset: Input[Dataset], text_emb: Output[Artifact], data_md5: str,
    model_text_encoder: str, model_audio_encoder: str, model_init: str, model_class_prompt: str,
    embed_text_extra_encoders: list, evaluate_english_only_text_encoder: str,
):
    """Every caption and class prompt through each frozen tower once."""
    from components.tasks import embed_text_task

    embed_text_task(dict(locals()))


def train(
    dataset: Input[Dataset], text_emb: Input[Artifact], model: Output[Model], metrics: Output[Metrics],
    data_md5: str, text_encoder: str, train_nodes: int, train_gpus: int, pod_gpus: int,
    cluster_namespace: str, cluster_cuda_image: str, cluster_train_cpu: str, cluster_train_memory: str,
    cluster_trainer_runtime: str, cluster_gpu_node_selector: dict, cluster_gpu_tolerations: list,
    cluster_shared_pvc: str, cluster_trainjob_timeout_s: int,
    model_text_encoder: str, model_audio_encoder: str, model_init: str, model_class_prompt: str,
    model_center_class_vectors: bool, model_text_centering: str, model_centroid_splits: list,
    model_centroid_min_texts: int, train_seed: int, train_epochs: int, train_batch_size: int,
    train_lr_head: float, train_lr_backbone: float, train_weight_decay: float, train_warmup_epochs: int,
    train_trainable: str, train_last_blocks: int, train_train_class_vectors: bool, train_init_anchor: float,
    train_augment_gain_db: float, train_augment_shift_s: float, train_init_temperature: float,
    train_max_logit_scale: float, train_select_metric: str, train_precision: str, train_device: str,
    audio_sample_rate: int, ingest_training_language: str,
):
    """The audio branch against one frozen tower (``text_encoder``; empty: model.text_encoder); more than
    one node goes through a Kubeflow Trainer TrainJob."""
    from components.tasks import train_task

    train_task(dict(locals()))


def evaluate(
    dataset: Input[Dataset], text_emb: Input[Artifact], model: Input[Model], reports: Output[Artifact],
    report: Output[HTML], summary: Output[Markdown], metrics: Output[Metrics], data_md5: str,
    evaluate_english_only_contrast: bool, evaluate_english_only_text_encoder: str, evaluate_chance_draws: int,
    evaluate_chance_seed: int, evaluate_plot_metric: str, evaluate_min_captions: int,
    evaluate_bootstrap_draws: int, evaluate_bootstrap_seed: int, evaluate_bootstrap_confidence: float,
    model_text_encoder: str, model_audio_encoder: str, model_init: str, model_class_prompt: str,
    model_center_class_vectors: bool, model_text_centering: str, model_centroid_splits: list,
    model_centroid_min_texts: int, train_seed: int, audio_sample_rate: int, ingest_training_language: str,
    english_only_model: Optional[Input[Model]] = None,
):
    """Multilingual retrieval of every system on the test split; the English-only contrast when given."""
    from components.tasks import evaluate_task

    evaluate_task(dict(locals()))


def check_drift(
    dataset: Input[Dataset], reports: Output[Artifact], report: Output[HTML], data_md5: str, reference_uri: str,
    drift_policy: str, drift_alpha: float, drift_columns: list, drift_pca_components: int,
    drift_embeddings_method: str, drift_embeddings_threshold: float, drift_min_rows: int, drift_max_rows: int,
    drift_reference_splits: list, drift_current_splits: list, audio_silence_rms_dbfs: float,
    validate_clip_level: float, ingest_training_language: str,
):
    """The new dataset against the production model's drift reference (Evidently); a failed gate stops
    the run before training, naming the drifted columns. Empty ``reference_uri``: nothing to compare."""
    from components.tasks import drift_check_task

    drift_check_task(dict(locals()))


def drift_profile(
    dataset: Input[Dataset], model: Input[Model], drift_reference: Output[Artifact], data_md5: str,
    drift_reference_splits: list, audio_silence_rms_dbfs: float, validate_clip_level: float,
    ingest_training_language: str,
):
    """The trained model's drift reference: its training clips' features and embeddings, and the model."""
    from components.tasks import drift_profile_task

    drift_profile_task(dict(locals()))


def package_model(
    dataset: Input[Dataset], model: Input[Model], reports: Input[Artifact], drift_reference: Input[Artifact],
    index: Output[Artifact],
    bento: Output[Model], data_md5: str, index_exact_below: int, index_hnsw_m: int, index_hnsw_ef_construction: int,
    index_hnsw_ef_search: int, index_include_audio: bool, package_model_name: str, package_min_val_gain: float,
    serve_max_upload_bytes: int, serve_max_audio_seconds: float, serve_max_texts: int, serve_max_text_chars: int,
    serve_max_k: int, serve_max_batch_size: int, serve_max_latency_ms: int, serve_timeout_s: int,
    serve_max_concurrency: int, serve_drift_log_max_bytes: int, serve_drift_log_backups: int,
    train_select_metric: str,
):
    """The dataset's index, then the quality gate: a model that passes leaves as a BentoML model archive
    and a Bento (the ``bento`` artifact); one that fails stops the run with the figures."""
    from components.tasks import package_task

    package_task(dict(locals()))


#: Every task runs in the CPU image except training, which runs in the CUDA one.
_CPU = (shard_indices, launcher_gpus, ingest_shard, merge_shards, validate_dataset, check_drift, embed_text,
        evaluate, drift_profile, package_model)
_CUDA = (train,)


def build(image: str, cuda_image: str) -> SimpleNamespace:
    """The components with their images; the bodies above are their source, run inside the image."""
    made = {f.__name__: dsl.component(base_image=image, install_kfp_package=False)(f) for f in _CPU}
    made.update({f.__name__: dsl.component(base_image=cuda_image, install_kfp_package=False)(f) for f in _CUDA})
    return SimpleNamespace(**made)
