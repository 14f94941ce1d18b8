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

    def __init__(self, outcome: str | None = "Complete", running_polls: int = 2, create_status: int = 201,
                 runtime_status: int = 200, flaky_polls: int = 0):
        self.outcome, self.running_polls, self.create_status = outcome, running_polls, create_status
        self.runtime_status, self.flaky_polls = runtime_status, flaky_polls
        self.created: dict | None = None
        self.deleted: list[str] = []
        self.polls = 0

    def __call__(self, request):
        if request.method == "GET" and request.path == f"/apis/{GROUP}/{VERSION}/clustertrainingruntimes/torch-distributed":
            if self.runtime_status != 200:
                return Answer(self.runtime_status, {"kind": "Status", "reason": "NotFound",
                                                    "message": 'clustertrainingruntimes "torch-distributed" not found'})
            return Answer(200, {"kind": "ClusterTrainingRuntime", "metadata": {"name": "torch-distributed"}})
        if request.method == "DELETE" and request.path.startswith(f"{TRAINJOBS}/"):
            self.deleted.append(request.path.rsplit("/", 1)[1])
            return Answer(200, {"kind": "Status", "status": "Success"})
        if request.method == "GET" and request.path == f"{TRAINJOBS}/cacara-abc" and self.created and self.flaky_polls:
            self.flaky_polls -= 1
            return Answer(503, {"kind": "Status", "message": "etcd leader changed"})
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
    assert [r.method for r in server.requests] == ["GET", "POST", "GET", "GET", "GET"]  # runtime checked first
    assert api.deleted == [], "a completed job is left for its logs"


def test_transient_answers_while_polling_are_retried():
    api = FakeTrainer("Complete", running_polls=0, flaky_polls=2)
    with Loopback(api) as server:
        job = submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))
    assert job["status"]["conditions"][0]["type"] == "Complete"


def test_a_missing_runtime_is_named_before_anything_is_submitted():
    api = FakeTrainer(runtime_status=404)
    with Loopback(api) as server:
        with pytest.raises(TrainJobError, match="ClusterTrainingRuntime 'torch-distributed' is not available.*404"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))
    assert api.created is None


def test_a_failed_trainjob_fails_the_step_with_its_message():
    api = FakeTrainer("Failed", running_polls=0)
    with Loopback(api) as server:
        with pytest.raises(TrainJobError, match="team-audio/cacara-abc failed: node-0 exited with code 1: CUDA OOM"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))
    assert api.deleted == ["cacara-abc"], "a failed job's nodes must not keep their GPUs"


def test_a_refused_submission_says_why():
    with Loopback(FakeTrainer(create_status=403)) as server:
        with pytest.raises(TrainJobError, match="refused TrainJob team-audio/cacara-abc: HTTP 403.*cannot create"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=60, poll_s=0.01, client=_client(server.url))


def test_the_wait_is_bounded():
    ticks = iter(range(0, 10_000, 50))
    api = FakeTrainer(None)
    with Loopback(api) as server:
        with pytest.raises(TrainJobError, match="did not finish within 120 s.*it was deleted"):
            submit_and_wait(trainjob_body(SPEC), timeout_s=120, poll_s=0.0, client=_client(server.url),
                            clock=lambda: next(ticks))
    assert api.deleted == ["cacara-abc"]


def test_an_unreachable_api_is_reported():
    with pytest.raises(TrainJobError, match="cannot reach the Kubernetes API"):
        submit_and_wait(trainjob_body(SPEC), timeout_s=5, poll_s=0.01, client=_client(f"http://127.0.0.1:{closed_port()}"))


class LocalTrainer(FakeTrainer):
    """The Trainer controller, emulated on this machine: a created TrainJob's command runs as
    ``numNodes`` processes with the ``PET_*`` variables the torch-distributed runtime injects, its
    ``/shared`` mount mapped to a local folder; the job completes when every node exits 0."""

    def __init__(self, shared, namespace: str):
        super().__init__()
        self.shared, self.namespace, self.nodes = shared, namespace, []

    def __call__(self, request):
        import os
        import subprocess
        import sys

        from tests.loopback import closed_port

        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"
        if request.method == "GET" and "/clustertrainingruntimes/" in request.path:
            return Answer(200, {"kind": "ClusterTrainingRuntime", "metadata": {"name": request.path.rsplit("/", 1)[1]}})
        if request.method == "POST" and request.path == path:
            self.created = request.json()
            trainer = self.created["spec"]["trainer"]
            command = [str(self.shared) + a[len("/shared"):] if a.startswith("/shared") else a
                       for a in trainer["command"]]
            assert command[0] == "torchrun"
            port = str(closed_port())
            for rank in range(trainer["numNodes"]):
                env = {**os.environ, "PET_NNODES": str(trainer["numNodes"]), "PET_NODE_RANK": str(rank),
                       "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]), "PET_MASTER_ADDR": "127.0.0.1",
                       "PET_MASTER_PORT": port, "OMP_NUM_THREADS": "1",
                       **{e["name"]: e["value"] for e in trainer.get("env", [])}}
                self.nodes.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *command[1:]],
                                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
            return Answer(201, self.created)
        if request.method == "GET" and self.created and request.path == f"{path}/{self.created['metadata']['name']}":
            codes = [n.poll() for n in self.nodes]
            status = {}
            if all(c is not None for c in codes):
                kind = "Complete" if all(c == 0 for c in codes) else "Failed"
                status = {"conditions": [{"type": kind, "status": "True", "message": f"exit codes {codes}"}]}
            return Answer(200, {**self.created, "status": status})
        return Answer(404, {"kind": "Status", "message": "not found"})


@pytest.mark.slow
def test_multi_node_train_task_runs_a_trainjob_and_publishes_its_model(tiny_corpus, tmp_path, monkeypatch):
    """train_nodes=2: the kfp train task copies its inputs to the shared volume, submits the TrainJob
    through the kubernetes client (configured by a kubeconfig, as outside a cluster), waits, and
    publishes what the two nodes trained as its Model artifact."""
    import json

    from kfp.dsl import Artifact, Dataset, Metrics, Model

    from cacara.config import flat_params
    from components.tasks import train_task
    from model.cacara_model import load_model

    dataset, text_emb, params = tiny_corpus
    p = {**params, "train": {**params["train"], "epochs": 2, "batch_size": 2}}
    shared = tmp_path / "shared"
    shared.mkdir()
    namespace = p["cluster"]["namespace"]
    trainer = LocalTrainer(shared, namespace)
    with Loopback(trainer) as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "loop",
            "clusters": [{"name": "loop", "cluster": {"server": server.url}}],
            "users": [{"name": "runner", "user": {"token": "sa-token"}}],
            "contexts": [{"name": "loop", "context": {"cluster": "loop", "user": "runner", "namespace": namespace}}]}))
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        monkeypatch.setenv("CACARA_SHARED_DIR", str(shared))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        cluster = p["cluster"]
        model = Model(uri=str(tmp_path / "model"))
        metrics = Metrics(uri=str(tmp_path / "metrics"))
        values = {**flat_params(p), "dataset": Dataset(uri=str(dataset)), "text_emb": Artifact(uri=str(text_emb)),
                  "model": model, "metrics": metrics, "data_md5": "md5-of-the-data", "text_encoder": "",
                  "train_nodes": 2, "train_gpus": 1, "pod_gpus": 0,
                  **{f"cluster_{k}": cluster[k] for k in ("namespace", "cuda_image", "train_cpu", "train_memory",
                                                         "trainer_runtime", "gpu_node_selector", "gpu_tolerations",
                                                         "trainjob_timeout_s")},
                  "cluster_shared_pvc": "cacara-shared"}
        train_task(values)
        for node in trainer.nodes:
            assert node.wait(timeout=5) == 0, node.stdout.read().decode()[-3000:]
    job = trainer.created
    assert job["spec"]["trainer"]["numNodes"] == 2 and job["spec"]["trainer"]["image"] == cluster["cuda_image"]
    assert all(r.headers.get("authorization") == "Bearer sa-token" for r in server.requests)
    published = load_model(tmp_path / "model")
    assert published.config["text_encoder"] == p["model"]["text_encoder"]
    assert model.metadata["data_md5"] == "md5-of-the-data" and model.metadata["onnx_sha256"]
    history = (tmp_path / "model" / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 3  # epochs 0..2, written once by rank 0
    assert "val_en_t2a_R@1" in metrics.metadata
    assert job["spec"]["activeDeadlineSeconds"] == cluster["trainjob_timeout_s"]
    assert list(shared.iterdir()) == [], "the run's folder on the shared volume is removed after publishing"


@pytest.mark.slow
def test_several_gpus_on_one_node_train_through_torchrun_inside_the_task(tiny_corpus, tmp_path):
    """train_gpus=2 on one node: the task runs torchrun with two processes (gloo on a CPU-only machine,
    NCCL on GPUs) and publishes rank 0's model."""
    from kfp.dsl import Artifact, Dataset, Metrics, Model

    from cacara.config import flat_params
    from components.tasks import train_task
    from model.cacara_model import load_model

    dataset, text_emb, params = tiny_corpus
    p = {**params, "train": {**params["train"], "epochs": 1, "batch_size": 2}}
    cluster = p["cluster"]
    model = Model(uri=str(tmp_path / "model"))
    values = {**flat_params(p), "dataset": Dataset(uri=str(dataset)), "text_emb": Artifact(uri=str(text_emb)),
              "model": model, "metrics": Metrics(uri=str(tmp_path / "m")), "data_md5": "x", "text_encoder": "",
              "train_nodes": 1, "train_gpus": 2, "pod_gpus": 0,
              **{f"cluster_{k}": v for k, v in cluster.items()}}
    train_task(values)
    assert load_model(tmp_path / "model").config["text_encoder"] == p["model"]["text_encoder"]
    assert model.metadata["best_epoch"] in (0, 1)
