"""Multi-node training through Kubeflow Trainer v2: the TrainJob the train step submits, and the wait.

Why a TrainJob: Kubeflow Pipelines runs a task as one pod; training on several nodes needs a gang of
pods that find each other. Kubeflow Trainer's ``torch-distributed`` ClusterTrainingRuntime starts
``numNodes`` pods and injects ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``,
``PET_MASTER_ADDR`` and ``PET_MASTER_PORT``, so the same ``torchrun -m cacara.cli train`` entry point
the single-node path runs works unchanged. Inputs and outputs travel through a ReadWriteMany volume
that the pipeline task and the TrainJob pods both mount.

The body is checked against the ``kubeflow-trainer-api`` models (the Trainer project's own pydantic
schema), so a field the API does not have fails here, not in the cluster. Submission goes through the official
``kubernetes`` client. Nothing here imports kfp.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)

GROUP = "trainer.kubeflow.org"
VERSION = "v1alpha1"
PLURAL = "trainjobs"
KIND = "TrainJob"
#: The replicated job and container the torch-distributed runtime names "node" (Trainer v2 manifests).
NODE = "node"
#: Who owns the runtime patch (TrainJob.spec.runtimePatches[].manager).
PATCH_MANAGER = "cacara.dev/train-step"
SHARED_VOLUME = "shared"


class TrainJobError(RuntimeError):
    """The cluster refused, failed or timed out the TrainJob; the message says which and why."""


@dataclass(frozen=True)
class TrainJobSpec:
    """What the train step asks the cluster for."""

    name: str
    namespace: str
    image: str
    command: list[str]
    num_nodes: int
    gpus_per_node: int
    cpu: str
    memory: str
    runtime: str = "torch-distributed"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Mapping[str, Any]] = ()
    pvc: str = ""
    mount_path: str = "/shared"
    env: Mapping[str, str] = field(default_factory=dict)
    deadline_s: int | None = None


def trainjob_body(spec: TrainJobSpec) -> dict[str, Any]:
    """The TrainJob manifest; it must survive a round trip through the kubeflow-trainer-api models
    unchanged (their ``from_dict`` drops fields the schema does not have, so a typo shows as a diff)."""
    if spec.num_nodes < 1 or spec.gpus_per_node < 0:
        raise ValueError(f"a TrainJob needs at least one node and no negative GPU count, got {spec}")
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_node:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_node)
    pod: dict[str, Any] = {}
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in spec.tolerations]
    if spec.pvc:
        pod["volumes"] = [{"name": SHARED_VOLUME, "persistentVolumeClaim": {"claimName": spec.pvc}}]
        pod["containers"] = [{"name": NODE, "volumeMounts": [{"name": SHARED_VOLUME, "mountPath": spec.mount_path}]}]
    trainer: dict[str, Any] = {
        "image": spec.image, "command": list(spec.command), "numNodes": spec.num_nodes,
        "numProcPerNode": max(1, spec.gpus_per_node),
        "resourcesPerNode": {"limits": limits, "requests": {"cpu": spec.cpu, "memory": spec.memory}},
    }
    if spec.env:
        trainer["env"] = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    body: dict[str, Any] = {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/part-of": "cacara"}},
        "spec": {"runtimeRef": {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": spec.runtime},
                 "trainer": trainer},
    }
    if spec.deadline_s:
        body["spec"]["activeDeadlineSeconds"] = int(spec.deadline_s)
    if pod:
        body["spec"]["runtimePatches"] = [{"manager": PATCH_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {
            "replicatedJobs": [{"name": NODE, "template": {"spec": {"template": {"spec": pod}}}}]}}}}]
    check_trainjob(body)
    return body


def check_trainjob(body: Mapping[str, Any]) -> None:
    """Refuse a body the kubeflow-trainer-api schema does not reproduce exactly."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    roundtrip = TrainerV1alpha1TrainJob.from_dict(dict(body)).to_dict()
    if roundtrip != body:
        raise ValueError(f"TrainJob body does not match the Trainer API schema: {_diff(body, roundtrip)}")


def _diff(a: Any, b: Any, path: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in b:
                return f"{path}.{key} is not in the schema"
            if key not in a:
                return f"{path}.{key} was added by the schema"
            found = _diff(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return ""
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _diff(x, y, f"{path}[{i}]"))), "")
    return "" if a == b else f"{path}: {a!r} became {b!r}"


def api_client():
    """In a pod: the service account's in-cluster config; elsewhere the user's kubeconfig."""
    from kubernetes import client, config

    import os

    try:
        config.load_incluster_config()
    except config.ConfigException:
        # KUBECONFIG read now, not when the kubernetes package was imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def state(job: Mapping[str, Any]) -> str | None:
    """"Complete" or "Failed" once a condition of that type is True, else None (still running)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return str(condition["type"])
    return None


#: HTTP statuses worth asking again about while waiting: the API server or a proxy was busy.
TRANSIENT = {429, 500, 502, 503, 504}


def submit_and_wait(body: Mapping[str, Any], timeout_s: float, poll_s: float = 15.0, client=None,
                    clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Check the runtime exists, create the TrainJob, then poll it until it completes, fails or
    ``timeout_s`` passes.

    Returns the final object. Raises TrainJobError naming the job and the API's answer on a missing
    runtime, a refused submission (RBAC, quota), a failed job (its condition's message) or a timeout.
    Transient answers while polling (429, 5xx, a dropped connection) are retried until the deadline. A
    job that failed or timed out, or whose wait was interrupted, is deleted, so its nodes do not keep
    holding GPUs after the pipeline task is gone (a kfp retry would otherwise start a second gang).
    """
    import urllib3
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    api = k8s.CustomObjectsApi(client or api_client())
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    runtime = body["spec"]["runtimeRef"]["name"]
    try:
        api.get_cluster_custom_object(GROUP, VERSION, "clustertrainingruntimes", runtime)
    except ApiException as exc:
        hint = " (install Kubeflow Trainer's runtimes)" if exc.status == 404 else ""
        raise TrainJobError(f"ClusterTrainingRuntime {runtime!r} is not available: HTTP {exc.status} "
                            f"{_message(exc)}{hint}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise TrainJobError(f"cannot reach the Kubernetes API to submit TrainJob {namespace}/{name}: {exc}") from None
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, dict(body))
    except ApiException as exc:
        raise TrainJobError(f"the cluster refused TrainJob {namespace}/{name}: HTTP {exc.status} "
                            f"{exc.reason}: {_message(exc)}") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise TrainJobError(f"cannot reach the Kubernetes API to submit TrainJob {namespace}/{name}: {exc}") from None
    log.info("submitted TrainJob %s/%s; waiting up to %.0f s", namespace, name, timeout_s)
    deadline = clock() + timeout_s
    finished = False
    try:
        while True:
            job = None
            try:
                job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            except ApiException as exc:
                if exc.status not in TRANSIENT:
                    raise TrainJobError(f"cannot read TrainJob {namespace}/{name}: HTTP {exc.status}: "
                                        f"{_message(exc)}") from None
                log.warning("TrainJob %s/%s: HTTP %s while polling; asking again", namespace, name, exc.status)
            except (OSError, urllib3.exceptions.HTTPError) as exc:
                log.warning("TrainJob %s/%s: %s while polling; asking again", namespace, name, exc)
            outcome = state(job) if job is not None else None
            if outcome == "Complete":
                log.info("TrainJob %s/%s completed", namespace, name)
                finished = True
                return job
            if outcome == "Failed":
                reason = next((c.get("message") or c.get("reason") for c in job["status"]["conditions"]
                               if c.get("type") == "Failed"), "no message")
                raise TrainJobError(f"TrainJob {namespace}/{name} failed: {reason}")
            if clock() >= deadline:
                raise TrainJobError(f"TrainJob {namespace}/{name} did not finish within {timeout_s:.0f} s "
                                    "(cluster.trainjob_timeout_s); it was deleted")
            time.sleep(poll_s)
    finally:
        if not finished:
            _delete(api, namespace, name)


def _delete(api, namespace: str, name: str) -> None:
    """Best effort: the job's nodes stop; a failure to delete is logged, not raised over the real error."""
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        log.info("deleted TrainJob %s/%s", namespace, name)
    except Exception as exc:  # noqa: BLE001 - never mask the error that brought us here
        log.warning("could not delete TrainJob %s/%s: %s", namespace, name, exc)


def _message(exc) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message") or exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or exc)
