"""Multi-node training: the TrainJob body against the Trainer API's own models, and its submission and
wait through the real kubernetes client against a loopback server standing in for the Kubernetes API.
"""

from __future__ import annotations

import pytest

from components.trainjob import (GROUP, NODE, PLURAL, VERSION, TrainJobError, TrainJobSpec, check_trainjob,
                                 submit_and_wait, trainjob_body)
from tests.loopback import Answer, Loopback, closed_port

SPEC = TrainJobSpec(name="cacara-abc", namespace="team-audio", image="registry.example/cacara-cuda:0.1.0",
                    command=["torchrun", "-m", "cacara.cli", "train", "--config", "/shared/r/train_config.json"],
                    num_nodes=4, gpus_per_node=8, cpu="32", memory="200Gi",
                    node_selector={"nvidia.com/gpu.present": "true"},
                    tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                    pvc="cacara-shared", env={"HF_HUB_OFFLINE": "1"}, deadline_s=7200)
TRAINJOBS = f"/apis/{GROUP}/{VERSION}/namespaces/team-audio/{PLURAL}"


def test_body_asks_for_nodes_gpus_and_the_torch_runtime():
    body = trainjob_body(SPEC)
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = TrainerV1alpha1TrainJob.from_dict(body)  # the Trainer project's schema accepts it
    assert job.spec.runtime_ref.name == "torch-distributed" and job.spec.runtime_ref.kind == "ClusterTrainingRuntime"
    trainer = body["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "32", "memory": "200Gi", "nvidia.com/gpu": "8"}
    assert trainer["command"][0] == "torchrun" and trainer["image"] == SPEC.image
    pod = body["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert pod["name"] == NODE
    pod_spec = pod["template"]["spec"]["template"]["spec"]
    assert pod_spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod_spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod_spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "cacara-shared"
    assert pod_spec["containers"][0]["volumeMounts"][0]["mountPath"] == "/shared"
    assert body["spec"]["activeDeadlineSeconds"] == 7200


def test_a_field_the_trainer_api_does_not_have_is_refused():
    body = trainjob_body(SPEC)
    body["spec"]["trainer"]["numNode"] = 4  # a typo the cluster would silently drop
    with pytest.raises(ValueError, match="spec.trainer.numNode is not in the schema"):
        check_trainjob(body)
    with pytest.raises(ValueError, match="at least one node"):
        trainjob_body(TrainJobSpec(**{**SPEC.__dict__, "num_nodes": 0}))


def _client(url: str):
    from kubernetes import client

    config = client.Configuration(host=url)
    config.retries = 0
    return client.ApiClient(config)


class FakeTrainer:
    """Answers like the Kubernetes API with the Trainer controller behind it: a TrainJob is created,
    reads back without conditions for ``running_polls`` polls, then with ``outcome``."""

    def __init__(self, outcome: str | None = "Complete", running_polls: int = 2, create_status: int = 201):
        self.outcome, self.running_polls, self.create_status = outcome, running_polls, create_status
        self.created: dict | None = None
        self.polls = 0

    def __call__(self, request):
        if request.method == "POST" and request.path == TRAINJOBS:
            if self.create_status >= 400:
                return Answer(self.create_status, {"kind": "Status", "status": "Failure", "reason": "Forbidden",
                                                   "message": 'trainjobs.trainer.kubeflow.org is forbidden: User '
                                                              '"system:serviceaccount:team-audio:default" cannot create'})
            self.created = request.json()
            return Answer(201, self.created)
        if request.method == "GET" and request.path == f"{TRAINJOBS}/cacara-abc" and self.created:
            self.polls += 1
            status = {}
            if self.polls > self.running_polls and self.outcome:
                message = "all nodes succeeded" if self.outcome == "Complete" else "node-0 exited with code 1: CUDA OOM"
                status = {"conditions": [{"type": self.outcome, "status": "True", "reason": self.outcome,
                                          "message": message}]}
            return Answer(200, {**self.created, "status": status})
        return Answer(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "message": "not found"})


def test_submit_creates_the_trainjob_and_waits_for_it_to_complete():
    api = FakeTrainer("Complete", running_polls=2)
    with Loopback(api) as server:
        job = submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))
    assert api.created == trainjob_body(SPEC)  # the API received exactly the validated body
    assert job["status"]["conditions"][0]["type"] == "Complete" and api.polls == 3
    assert [r.method for r in server.requests] == ["POST", "GET", "GET", "GET"]


def test_a_failed_trainjob_fails_the_step_with_its_message():
    with Loopback(FakeTrainer("Failed", running_polls=0)) as server:
        with pytest.raises(TrainJobError, match="team-audio/cacara-abc failed: node-0 exited with code 1: CUDA OOM"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))


def test_a_refused_submission_says_why():
    with Loopback(FakeTrainer(create_status=403)) as server:
        with pytest.raises(TrainJobError, match="refused TrainJob team-audio/cacara-abc: HTTP 403.*cannot create"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))


def test_the_wait_is_bounded():
    ticks = iter(range(0, 10_000, 50))
    with Loopback(FakeTrainer(None)) as server:
        with pytest.raises(TrainJobError, match="did not finish within 120 s.*left running"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=120, poll_s=0.0, client=_client(server.url),
                            clock=lambda: next(ticks))


def test_an_unreachable_api_is_reported():
    with pytest.raises(TrainJobError, match="cannot reach the Kubernetes API"):
        submit_and_wait(trainjob_body(SPEC), timeout_s=5, poll_s=0.01, client=_client(f"http://127.0.0.1:{closed_port()}"))
