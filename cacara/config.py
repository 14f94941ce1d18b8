"""Typed settings: ``params.yaml`` as validated sections, and one config per pipeline step.

Why typed configs per step: a step receives only the settings it reads, so a kfp component can expose
exactly those as its parameters and a dvc stage can declare exactly those as its ``params:`` (a test
checks both against :attr:`StepConfig.PARAMS`). Why pydantic: every knob gets a type and bounds, and a
wrong value or an unknown key is refused before any work, in one line that names the key.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Mapping, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cacara.manifest import SPLITS

CHECKS = ("schema", "unique_ids", "captions_present", "caption_length", "training_language", "sample_rate",
          "duration", "audio_decodable", "split_fractions", "rms_level", "clipping")
HEADLINE_METRICS = ("t2a_R@1", "t2a_R@5", "t2a_R@10", "t2a_mAP@10", "a2t_R@1", "a2t_R@5", "a2t_R@10", "a2t_mAP@10")
FORMATS = ("auto", "canonical", "manifest", "clotho", "audiocaps")
LANGUAGE_CODE = r"^[a-z]{2,3}([-_][A-Za-z0-9]{2,8})*$"

Split = Literal["train", "val", "test"]
Check = Literal[CHECKS]  # type: ignore[valid-type]
Metric = Literal[HEADLINE_METRICS]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """Settings that cannot be used; the message names each offending key and what it accepts."""


class Section(BaseModel):
    """A group of params.yaml; unknown keys are errors (a typo must not silently keep a default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(Section):
    source: str = Field(min_length=1)
    format: Literal[FORMATS]  # type: ignore[valid-type]
    work_dir: str = Field(min_length=1)


class AudioSection(Section):
    sample_rate: int = Field(ge=8000, le=192000)
    min_duration_s: float = Field(ge=0)
    max_duration_s: float = Field(gt=0, le=3600)
    max_file_bytes: int = Field(gt=0)
    silence_rms_dbfs: float = Field(le=0)

    @model_validator(mode="after")
    def _durations(self) -> "AudioSection":
        if self.min_duration_s >= self.max_duration_s:
            raise ValueError(f"min_duration_s ({self.min_duration_s}) must be below max_duration_s "
                             f"({self.max_duration_s})")
        return self


class SplitSection(Section):
    seed: int
    train: float = Field(ge=0, le=1)
    val: float = Field(ge=0, le=1)
    test: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _positive(self) -> "SplitSection":
        if self.train <= 0 or self.train + self.val + self.test <= 0:
            raise ValueError("the train fraction must be positive")
        return self

    def fractions(self) -> dict[str, float]:
        return {s: float(getattr(self, s)) for s in SPLITS}


def _whole_filesystem(root: str) -> bool:
    """A root that would allow everything on its filesystem or store: ``/``, ``//``, ``/..``, ``s3://``,
    ``file:///``."""
    import os.path
    import posixpath

    root = root.strip()
    path = "/" + root.split("://", 1)[1] if "://" in root else os.path.abspath(root) if root else "/"
    return posixpath.normpath(path) in ("/", "//")


class IngestSection(Section):
    max_bad_fraction: float = Field(ge=0, le=1)
    training_language: str = Field(pattern=LANGUAGE_CODE)
    audio_format: Literal["flac", "wav"]
    allowed_roots: list[str] = Field(default_factory=list)  # folders or URL prefixes, besides the source's own

    @model_validator(mode="after")
    def _roots_are_folders(self) -> "IngestSection":
        for root in self.allowed_roots:
            if _whole_filesystem(root):
                raise ValueError(f"allowed_roots entry {root!r}: name a folder or a bucket prefix, not a whole "
                                 "filesystem")
        return self


class ValidateSection(Section):
    caption_min_chars: int = Field(ge=0)
    caption_max_chars: int = Field(ge=1)
    min_rms_dbfs: float = Field(le=0)
    max_clipping_ratio: float = Field(ge=0, le=1)
    clip_level: float = Field(gt=0, le=1)
    split_tolerance: float = Field(ge=0, le=1)
    language_min_words: int = Field(ge=1)
    language_max_other_confidence: float = Field(ge=0, le=1)
    critical: list[Check] = Field(default_factory=list)
    warning: list[Check] = Field(default_factory=list)

    @model_validator(mode="after")
    def _disjoint(self) -> "ValidateSection":
        both = sorted(set(self.critical) & set(self.warning))
        if both:
            raise ValueError(f"checks listed as both critical and warning: {both}")
        if self.caption_min_chars > self.caption_max_chars:
            raise ValueError(f"caption_min_chars ({self.caption_min_chars}) is above caption_max_chars "
                             f"({self.caption_max_chars})")
        return self


class ModelSection(Section):
    text_encoder: str = Field(min_length=1)
    audio_encoder: str = Field(min_length=1)
    init: Literal["text_centric", "random"]
    class_prompt: str = Field(pattern=r"\{\}")
    center_class_vectors: bool
    text_centering: Literal["none", "global", "language"]
    centroid_splits: list[Literal["train", "val"]] = Field(min_length=1)  # never test: its queries are scored
    centroid_min_texts: int = Field(ge=1)


class EmbedTextSection(Section):
    extra_encoders: list[str] = Field(default_factory=list)


class TrainSection(Section):
    seed: int
    epochs: int = Field(ge=1, le=100000)
    batch_size: int = Field(ge=2)  # a contrastive batch needs a negative
    lr_head: float = Field(gt=0, le=10)
    lr_backbone: float = Field(ge=0, le=10)
    weight_decay: float = Field(ge=0)
    warmup_epochs: int = Field(ge=0)
    trainable: Literal["projection", "last_blocks", "all"]
    last_blocks: int = Field(ge=0)
    train_class_vectors: bool
    init_anchor: float = Field(ge=0)
    augment_gain_db: float = Field(ge=0, le=60)
    augment_shift_s: float = Field(ge=0, le=60)
    init_temperature: float = Field(gt=0, le=1)
    max_logit_scale: float = Field(ge=1)
    select_metric: Literal["mean_R@1", "t2a_R@1", "a2t_R@1", "t2a_R@5"]
    precision: Literal["auto", "fp32", "bf16"]
    device: Literal["auto", "cpu", "cuda"]


class EvaluateSection(Section):
    english_only_contrast: bool
    english_only_text_encoder: str = Field(min_length=1)
    chance_draws: int = Field(ge=1)
    chance_seed: int
    plot_metric: Metric
    min_captions: int = Field(ge=1)
    bootstrap_draws: int = Field(ge=1)
    bootstrap_seed: int
    bootstrap_confidence: float = Field(gt=0, lt=1)


class IndexSection(Section):
    exact_below: int = Field(ge=0)
    hnsw_m: int = Field(ge=4, le=256)
    hnsw_ef_construction: int = Field(ge=8, le=4096)
    hnsw_ef_search: int = Field(ge=1, le=4096)
    include_audio: bool


class PackageSection(Section):
    model_name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$", max_length=63)
    min_val_gain: float = Field(ge=-100, le=100)


class ServeSection(Section):
    max_upload_bytes: int = Field(ge=1024, le=2**31)
    max_audio_seconds: float = Field(gt=0, le=3600)
    max_texts: int = Field(ge=1, le=10000)
    max_text_chars: int = Field(ge=1, le=100000)
    max_k: int = Field(ge=1, le=10000)
    max_batch_size: int = Field(ge=1, le=4096)
    max_latency_ms: int = Field(ge=1, le=600000)
    timeout_s: int = Field(ge=1, le=3600)
    max_concurrency: int = Field(ge=1, le=100000)
    drift_log_max_bytes: int = Field(ge=4096, le=2**40)
    drift_log_backups: int = Field(ge=1, le=1000)

    @model_validator(mode="after")
    def _batches_hold_a_request(self) -> "ServeSection":
        if self.batching and self.max_texts > self.max_batch_size:
            raise ValueError(f"max_texts ({self.max_texts}) is above max_batch_size ({self.max_batch_size}): "
                             "a request of max_texts texts must fit one batch")
        return self

    @property
    def batching(self) -> bool:
        """``max_batch_size: 1`` turns adaptive batching off: every request runs on its own."""
        return self.max_batch_size >= 2


DRIFT_COLUMNS = ("duration_s", "rms_dbfs", "silence_ratio", "clipping_ratio", "bandwidth_hz", "orig_sample_rate",
                 "orig_channels",
                 "caption_chars", "caption_language", "emb_norm", "emb_centroid_cos", "emb_pc")


class DriftSection(Section):
    policy: Literal["fail", "warn"]
    alpha: float = Field(gt=0, lt=1)
    columns: list[Literal[DRIFT_COLUMNS]] = Field(min_length=1)  # type: ignore[valid-type]
    pca_components: int = Field(ge=1, le=64)
    embeddings_method: Literal["mmd", "model", "distance"]
    embeddings_threshold: float = Field(gt=0)
    min_rows: int = Field(ge=3, le=100000)
    max_rows: int = Field(ge=32, le=100000)
    reference_splits: list[Split] = Field(min_length=1)
    current_splits: list[Split] = Field(default_factory=list)

    @model_validator(mode="after")
    def _threshold_fits_the_method(self) -> "DriftSection":
        if self.embeddings_method == "model" and not 0.5 < self.embeddings_threshold < 1:
            raise ValueError(f"embeddings_threshold {self.embeddings_threshold}: the model method scores a ROC AUC "
                             "(0.5 = no drift), so its threshold lies between 0.5 and 1")
        if self.min_rows > self.max_rows:
            raise ValueError(f"min_rows ({self.min_rows}) is above max_rows ({self.max_rows})")
        return self


class Toleration(Section):
    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class ClusterSection(Section):
    """How the Kubeflow pipeline runs; fixed when the pipeline is compiled, except the counts."""

    image: str = Field(min_length=1)
    cuda_image: str = Field(min_length=1)
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    ingest_shards: int = Field(ge=1, le=1024)
    train_nodes: int = Field(ge=1, le=1024)
    train_gpus: int = Field(ge=0, le=64)
    train_cpu: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    train_memory: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    task_cpu: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    task_memory: str = Field(pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[Toleration] = Field(default_factory=list)
    storage_secret: str = ""
    storage_secret_keys: list[str] = Field(default_factory=list)
    retries: int = Field(ge=0, le=20)
    retry_backoff: str = Field(pattern=r"^[0-9]+s$")
    shared_pvc: str = ""
    trainer_runtime: str = Field(min_length=1)
    trainjob_timeout_s: int = Field(ge=60)


class Params(Section):
    """The whole of params.yaml."""

    data: DataSection
    audio: AudioSection
    split: SplitSection
    ingest: IngestSection
    validate_: ValidateSection = Field(alias="validate")
    model: ModelSection
    embed_text: EmbedTextSection
    train: TrainSection
    evaluate: EvaluateSection
    index: IndexSection
    package: PackageSection
    serve: ServeSection
    drift: DriftSection
    cluster: ClusterSection

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, protected_namespaces=())


def _describe(error: Mapping[str, Any], prefix: str = "") -> str:
    where = ".".join(str(p) for p in error["loc"] if p != "validate_") or "(top level)"
    where = (prefix + where) if prefix else where
    given = error.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return f"{where}: {message}{shown}"


def describe(exc: ValidationError, prefix: str = "") -> str:
    """One line per offending key: ``train.epochs: Input should be greater than or equal to 1 (got -1)``."""
    return "; ".join(_describe(e, prefix) for e in exc.errors())


def validate_params(params: Mapping[str, Any]) -> Params:
    """The whole params tree, typed; raises ConfigError naming every bad key."""
    try:
        return Params.model_validate(params)
    except ValidationError as exc:
        raise ConfigError(f"invalid parameters: {describe(exc)}") from None


def lookup(params: Mapping[str, Any], dotted: str) -> Any:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"params has no {dotted!r}")
        node = node[part]
    return node


C = TypeVar("C", bound="StepConfig")


class StepConfig(BaseModel):
    """The settings one step reads, and nothing else.

    ``PARAMS`` maps each field to its params.yaml key (a whole section or one value); the dvc stage's
    ``params:`` and the kfp component's parameters are exactly these keys.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    PARAMS: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_params(cls: type[C], params: Mapping[str, Any]) -> C:
        """From the whole params tree: the tree is validated first, so a typo anywhere is refused."""
        validate_params(params)
        return cls.from_values({field: lookup(params, key) for field, key in cls.PARAMS.items()})

    @classmethod
    def from_values(cls: type[C], values: Mapping[str, Any]) -> C:
        """From this step's values alone (what a kfp component receives), keyed by field name."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            key_of = cls.PARAMS
            errors = []
            for e in exc.errors():
                loc = list(e["loc"])
                head = key_of.get(str(loc[0]), str(loc[0])) if loc else ""
                errors.append(_describe({**e, "loc": [head, *loc[1:]]}))
            raise ConfigError(f"invalid {cls.__name__} settings: {'; '.join(errors)}") from None

    @classmethod
    def param_keys(cls) -> list[str]:
        return list(cls.PARAMS.values())

    @classmethod
    def leaves(cls) -> dict[str, tuple[str, str | None]]:
        """Flat parameter names (``train_epochs``, ``ingest_training_language``) -> (field, sub-key or None).

        A kfp component and the pipeline take these: one scalar or list per params.yaml value, so the
        cache key of a task holds exactly the values its step reads.
        """
        out: dict[str, tuple[str, str | None]] = {}
        for field, key in cls.PARAMS.items():
            annotation = cls.model_fields[field].annotation
            if isinstance(annotation, type) and issubclass(annotation, Section):
                for sub in annotation.model_fields:
                    out[f"{key}_{sub}"] = (field, sub)
            else:
                out[key.replace(".", "_")] = (field, None)
        return out

    @classmethod
    def from_leaves(cls: type[C], values: Mapping[str, Any]) -> C:
        """From flat parameter names (:meth:`leaves`); other keys in ``values`` are ignored."""
        fields: dict[str, Any] = {}
        for leaf, (field, sub) in cls.leaves().items():
            if leaf not in values:
                raise ConfigError(f"{cls.__name__}: parameter {leaf!r} is missing")
            if sub is None:
                fields[field] = values[leaf]
            else:
                fields.setdefault(field, {})[sub] = values[leaf]
        return cls.from_values(fields)


class IngestConfig(StepConfig):
    PARAMS = {"format": "data.format", "audio": "audio", "split": "split", "ingest": "ingest"}
    format: Literal[FORMATS]  # type: ignore[valid-type]
    audio: AudioSection
    split: SplitSection
    ingest: IngestSection


class ValidateConfig(StepConfig):
    PARAMS = {"validate_": "validate", "audio": "audio", "split": "split",
              "training_language": "ingest.training_language"}
    validate_: ValidateSection = Field(alias="validate")
    audio: AudioSection
    split: SplitSection
    training_language: str = Field(pattern=LANGUAGE_CODE)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class EmbedTextConfig(StepConfig):
    PARAMS = {"text_encoder": "model.text_encoder", "audio_encoder": "model.audio_encoder", "init": "model.init",
              "class_prompt": "model.class_prompt", "extra_encoders": "embed_text.extra_encoders",
              "english_only_text_encoder": "evaluate.english_only_text_encoder"}
    text_encoder: str = Field(min_length=1)
    audio_encoder: str = Field(min_length=1)
    init: Literal["text_centric", "random"]
    class_prompt: str = Field(pattern=r"\{\}")
    extra_encoders: list[str]
    english_only_text_encoder: str = Field(min_length=1)


class TrainConfig(StepConfig):
    PARAMS = {"model": "model", "train": "train", "sample_rate": "audio.sample_rate",
              "training_language": "ingest.training_language"}
    model: ModelSection
    train: TrainSection
    sample_rate: int = Field(ge=8000, le=192000)
    training_language: str = Field(pattern=LANGUAGE_CODE)


class EvaluateConfig(StepConfig):
    PARAMS = {"evaluate": "evaluate", "model": "model", "seed": "train.seed", "sample_rate": "audio.sample_rate",
              "training_language": "ingest.training_language"}
    evaluate: EvaluateSection
    model: ModelSection
    seed: int
    sample_rate: int = Field(ge=8000, le=192000)
    training_language: str = Field(pattern=LANGUAGE_CODE)


class IndexConfig(StepConfig):
    PARAMS = {"index": "index"}
    index: IndexSection


class PackageConfig(StepConfig):
    PARAMS = {"package": "package", "serve": "serve", "select_metric": "train.select_metric"}
    package: PackageSection
    serve: ServeSection
    select_metric: Literal["mean_R@1", "t2a_R@1", "a2t_R@1", "t2a_R@5"]


class DriftProfileConfig(StepConfig):
    """What the drift features of a clip depend on, and which splits form the reference."""

    PARAMS = {"reference_splits": "drift.reference_splits", "silence_rms_dbfs": "audio.silence_rms_dbfs",
              "clip_level": "validate.clip_level", "training_language": "ingest.training_language"}
    reference_splits: list[Split] = Field(min_length=1)
    silence_rms_dbfs: float = Field(le=0)
    clip_level: float = Field(gt=0, le=1)
    training_language: str = Field(pattern=LANGUAGE_CODE)


class DriftConfig(StepConfig):
    PARAMS = {"drift": "drift", "silence_rms_dbfs": "audio.silence_rms_dbfs", "clip_level": "validate.clip_level",
              "training_language": "ingest.training_language"}
    drift: DriftSection
    silence_rms_dbfs: float = Field(le=0)
    clip_level: float = Field(gt=0, le=1)
    training_language: str = Field(pattern=LANGUAGE_CODE)

    @property
    def profile(self) -> DriftProfileConfig:
        return DriftProfileConfig(reference_splits=self.drift.reference_splits, silence_rms_dbfs=self.silence_rms_dbfs,
                                  clip_level=self.clip_level, training_language=self.training_language)


STEP_CONFIGS: dict[str, type[StepConfig]] = {
    "ingest": IngestConfig, "validate": ValidateConfig, "embed_text": EmbedTextConfig, "train": TrainConfig,
    "evaluate": EvaluateConfig, "index": IndexConfig, "package": PackageConfig, "profile": DriftProfileConfig,
    "drift": DriftConfig,
}


def flat_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Every value the steps read, by its flat name (``train_epochs``): the pipeline's parameters."""
    validate_params(params)
    out: dict[str, Any] = {}
    for config in STEP_CONFIGS.values():
        for leaf, (field, sub) in config.leaves().items():
            key = config.PARAMS[field]
            out[leaf] = lookup(params, key if sub is None else f"{key}.{sub}")
    return out
