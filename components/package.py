"""Step 7, package: a trained model that passes the quality gate, with its ONNX export and search index,
saved to the BentoML model store and built into a Bento, ready to serve.

The gate (``package.min_val_gain``): the selected model's validation score must beat the untrained
text-centric model's (epoch 0 of the same training, same validation clips) by more than the margin;
otherwise nothing is stored and the step fails with the figures. Everything packaged is recorded by
sha256, with the metrics, the data md5 and the towers, in the model store entry's metadata.

The Bento is built offline (``python.lock_packages: false``: locking resolves against pypi.org) from a
build folder holding the service entry point and the project's code, so it builds the same from a
checkout or from an installed package (the Kubeflow image).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cacara.config import PackageConfig

log = logging.getLogger(__name__)

RECORD = "package.json"
MODEL_ARCHIVE = "model.bentomodel"
BENTO_ARCHIVE = "cacara-search.bento"
#: Not "cacara": `bentoml serve NAME:TAG` imports NAME as a module first, which would find the installed
#: package instead of the Bento's own copy of the code.
BENTO_NAME = "cacara-search"
SERVICE = "cacara.service:CacaraSearch"
MODEL_ENV = "CACARA_BENTO_MODEL"
DRIFT_REFERENCE = "drift_reference"  # the stored model's folder holding the drift profile (components/drift.py)
#: Where an installed copy (the images) finds the pinned requirements the Bento installs.
REQUIREMENTS_ENV = "CACARA_REQUIREMENTS"


class QualityGateFailed(RuntimeError):
    """The trained model is not good enough to serve; the message holds the figures."""


@dataclass
class PackageResult:
    model_tag: str
    bento_tag: str
    gate: dict[str, Any]
    out_dir: Path

    def summary(self) -> str:
        return (f"package: {self.model_tag} (gate: val {self.gate['selected']:.2f} vs untrained "
                f"{self.gate['untrained']:.2f}), Bento {self.bento_tag}")


def quality_gate(model_dir: Path, config: PackageConfig) -> dict[str, Any]:
    """The selected epoch's validation score against epoch 0 (the untrained model) in the model's history."""
    history = model_dir / "history.csv"
    if not history.exists():
        raise QualityGateFailed(f"{model_dir} has no history.csv: cannot compare it with the untrained model")
    with history.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    config_json = json.loads((model_dir / "config.json").read_text())
    selected_epoch = int(config_json["epoch"])
    by_epoch = {int(r["epoch"]): float(r["val_score"]) for r in rows}
    if 0 not in by_epoch or selected_epoch not in by_epoch:
        raise QualityGateFailed(f"{history} lacks epoch 0 or the selected epoch {selected_epoch}")
    gate = {"metric": f"validation {config.select_metric} (English)", "untrained": by_epoch[0],
            "selected": by_epoch[selected_epoch], "selected_epoch": selected_epoch,
            "min_gain": config.package.min_val_gain}
    gate["gain"] = gate["selected"] - gate["untrained"]
    gate["passed"] = gate["gain"] > gate["min_gain"]
    if not gate["passed"]:
        raise QualityGateFailed(
            f"quality gate failed: {gate['metric']} {gate['selected']:.2f} at epoch {selected_epoch} vs "
            f"{gate['untrained']:.2f} untrained: a gain of {gate['gain']:.2f} points, not above "
            f"package.min_val_gain {gate['min_gain']:.2f}; nothing was packaged")
    return gate


def _files(root: Path) -> dict[str, str]:
    from model.weights_cache import sha256_file

    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def package(model_dir: str | Path, index_dir: str | Path, out_dir: str | Path, config: PackageConfig,
            metrics: str | Path | None = None, data_md5: str = "", export: bool = False,
            drift_reference: str | Path | None = None) -> PackageResult:
    """Gate, store and build. ``metrics`` is the evaluate step's metrics.json (recorded, not gated on).
    ``export`` also writes both as archives into ``out_dir`` (``MODEL_ARCHIVE``, ``BENTO_ARCHIVE``): how
    they leave a machine whose store is temporary (a Kubeflow task) for object storage.
    ``drift_reference`` (the drift-profile step's output) travels with the model: the service measures its
    requests as it was measured, and the serving-log check compares with it."""
    import bentoml

    model, index, out = Path(model_dir), Path(index_dir), Path(out_dir)
    reference = Path(drift_reference) if drift_reference else None
    from components.drift import PROFILE_MODEL, PROFILE_RECORD, is_profile, model_sha

    if reference is not None:
        if not is_profile(reference):
            raise FileNotFoundError(f"{reference} is not a drift reference (no {PROFILE_RECORD}): "
                                    "run `cacara drift-profile`")
        made_by = json.loads((reference / PROFILE_RECORD).read_text()).get("model_sha256")
        ours = model_sha(model)
        if made_by != ours:
            raise ValueError(f"{reference} was made with another model (ONNX sha256 {made_by}, this one {ours})")
    gate = quality_gate(model, config)
    out.mkdir(parents=True, exist_ok=True)
    model_config = json.loads((model / "config.json").read_text())
    evaluation = json.loads(Path(metrics).read_text()) if metrics else {}
    index_record = json.loads((index / "index.json").read_text())
    metadata = {
        "data_md5": data_md5, "text_encoder": model_config["text_encoder"],
        "audio_encoder": model_config["audio_encoder"], "selected_epoch": gate["selected_epoch"],
        "quality_gate": gate, "index_size": index_record["count"], "index_kind": index_record["kind"],
        "serve": config.serve.model_dump(),
        "metrics": {k: v for k, v in evaluation.items() if k != "checks"},
        "checks": {k: v for k, v in (evaluation.get("checks") or {}).items() if not isinstance(v, list)},
    }
    # The version is a hash of what is stored: packaging the same model twice gives the same tags and the
    # same package.json (dvc.lock stays put), and a changed model a new version.
    reference_files = ({k: v for k, v in _files(reference).items() if not k.startswith(PROFILE_MODEL + "/")}
                       if reference is not None else None)
    version = _digest({"model": _files(model), "index": _files(index), "metadata": metadata,
                       **({"drift_reference": reference_files} if reference_files is not None else {})})
    tag = f"{config.package.model_name}:{version}"
    _forget(bentoml.models, tag)
    with bentoml.models.create(tag, labels={"part-of": "cacara"}, metadata=metadata) as stored:
        target = Path(stored.path)
        shutil.copytree(model, target / "model")
        shutil.copytree(index, target / "index")
        if reference is not None:  # without its copy of the model: the stored model is that model
            shutil.copytree(reference, target / DRIFT_REFERENCE, ignore=lambda d, names: (
                [PROFILE_MODEL] if Path(d) == reference else []))
        sha = _files(target)
        (target / RECORD).write_text(json.dumps({**metadata, "sha256": sha}, indent=1, sort_keys=True))
    model_tag = str(stored.tag)
    log.info("stored %s in the BentoML model store (%d files)", model_tag, len(sha))
    try:
        bento_tag = build_bento(model_tag)
    except BaseException:
        bentoml.models.delete(model_tag)  # no stored model without its Bento
        raise
    record = {"model_tag": model_tag, "bento_tag": bento_tag, "quality_gate": gate, "data_md5": data_md5,
              "sha256": sha}
    if export:
        bentoml.models.export_model(model_tag, str(out / MODEL_ARCHIVE))
        bentoml.bentos.export_bento(bento_tag, str(out / BENTO_ARCHIVE))
        from model.weights_cache import sha256_file

        record["archives"] = {name: sha256_file(out / name) for name in (MODEL_ARCHIVE, BENTO_ARCHIVE)}
    (out / RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    result = PackageResult(model_tag, bento_tag, gate, out)
    log.info("%s", result.summary())
    return result


def _digest(value: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _forget(store, tag: str) -> None:
    """Drop an earlier entry of the same tag (same content by construction) so it can be made again."""
    import bentoml

    try:
        store.get(tag)
    except bentoml.exceptions.NotFound:
        return
    store.delete(tag)


def build_bento(model_tag: str) -> str:
    """``bentoml build`` of the service for ``model_tag``, offline, from a folder holding exactly what the
    Bento needs: the project's packages (the service is ``cacara/service.py``) and the pinned requirements."""
    import os

    import bentoml
    from bentoml._internal.bento.build_config import BentoEnvSchema  # what bentos.build takes for envs

    import cacara
    import components
    import model as model_pkg

    with tempfile.TemporaryDirectory() as tmp:
        ctx = Path(tmp)
        for package in (cacara, components, model_pkg):
            source = Path(package.__file__).parent
            shutil.copytree(source, ctx / source.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copyfile(_requirements_file(), ctx / "requirements.txt")
        version = _digest({"model": model_tag, "code": _files(ctx)})
        _forget(bentoml.bentos, f"{BENTO_NAME}:{version}")
        previous = os.environ.get(MODEL_ENV)
        os.environ[MODEL_ENV] = model_tag  # the service module resolves its model when bentoml imports it
        try:
            bento = bentoml.bentos.build(
                SERVICE, name=BENTO_NAME, version=version, build_ctx=str(ctx),
                include=["cacara/**/*.py", "cacara/static/*", "components/**/*.py", "model/**/*.py",
                         "model/**/*.md", "requirements.txt"],
                labels={"part-of": "cacara"},
                python={"requirements_txt": "requirements.txt", "lock_packages": False},
                envs=[BentoEnvSchema(name=name, value=value) for name, value in
                      ((MODEL_ENV, model_tag), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"))])
        finally:
            if previous is None:
                os.environ.pop(MODEL_ENV, None)
            else:
                os.environ[MODEL_ENV] = previous
    return str(bento.tag)


def _requirements_file() -> Path:
    """``$CACARA_REQUIREMENTS`` (the images set it), else requirements.lock of the checkout."""
    import os

    import cacara

    for candidate in (os.environ.get(REQUIREMENTS_ENV), Path(cacara.__file__).resolve().parent.parent / "requirements.lock"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    raise FileNotFoundError("requirements.lock not found beside the code: the Bento needs the pinned versions")
