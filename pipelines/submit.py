"""Submitting the training pipeline to a Kubeflow Pipelines cluster with the official client.

Settings are validated before anything is sent (every step's typed config is built from them), so a
typo fails on the laptop, not an hour into a run. The token comes from the environment, never from a
file in the repo: ``KF_PIPELINES_TOKEN``, or the path in ``KF_PIPELINES_TOKEN_FILE``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from cacara.config import STEP_CONFIGS, validate_params
from pipelines.training import compile_pipeline, pipeline_defaults

log = logging.getLogger(__name__)

TOKEN_ENV = "KF_PIPELINES_TOKEN"
TOKEN_FILE_ENV = "KF_PIPELINES_TOKEN_FILE"
HOST_ENV = "KF_PIPELINES_ENDPOINT"


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the run; the message says which and why."""


@dataclass
class Submitted:
    run_id: str
    experiment: str
    arguments: dict[str, Any]


def _token() -> str | None:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV]
    path = os.environ.get(TOKEN_FILE_ENV)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SubmitError(f"{TOKEN_FILE_ENV}={path} cannot be read: {exc}") from None
    return None


def submit(params: Mapping[str, Any], host: str | None, md5: str, experiment: str = "cacara",
           run_name: str | None = None, namespace: str | None = None, source: str | None = None) -> Submitted:
    """Compile the pipeline for ``params`` and create a run of it; returns the run's id."""
    import kfp
    import urllib3
    from kfp_server_api.exceptions import ApiException

    validated = validate_params(params)
    for config in STEP_CONFIGS.values():
        config.from_params(params)
    host = host or os.environ.get(HOST_ENV)
    if not host:
        raise SubmitError(f"no Kubeflow Pipelines host: pass --host URL or set {HOST_ENV}")
    namespace = namespace or validated.cluster.namespace
    arguments = pipeline_defaults(params, md5)
    if source:
        arguments["source_uri"] = source
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(params, Path(tmp) / "pipeline.yaml", md5)
        try:
            client = kfp.Client(host=host, existing_token=_token(), namespace=namespace)
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
                namespace=namespace)
        except ApiException as exc:
            raise SubmitError(f"{host} refused the run: HTTP {exc.status} {exc.reason}: "
                              f"{(exc.body or '').strip()[:500]}") from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise SubmitError(f"cannot reach Kubeflow Pipelines at {host}: {exc}") from None
    log.info("created run %s in experiment %s", result.run_id, experiment)
    return Submitted(result.run_id, experiment, arguments)
