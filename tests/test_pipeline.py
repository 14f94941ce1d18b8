"""The Kubeflow pipeline: components expose exactly their steps' settings, the compiled YAML is current
and carries the cluster settings, it runs whole in kfp.local, and submit talks to the API correctly.

No cluster runs here: submission is checked against a loopback server that records what the real kfp
client sends; GPU, retry and caching settings are checked on the compiled YAML, since kfp.local ignores
them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cacara.config import STEP_CONFIGS, ConfigError, flat_params
from cacara.params import load_params
from pipelines import training
from tests.conftest import REPO, demo_subset
from tests.loopback import Answer, Loopback, closed_port

#: component -> (its step's config, the parameters it takes besides that config's settings)
COMPONENTS = {
    "ingest_shard": ("ingest", {"source_uri", "data_md5", "shard", "num_shards"}),
    "merge_shards": ("ingest", {"data_md5"}),
    "validate_dataset": ("validate", {"data_md5"}),
    "embed_text": ("embed_text", {"data_md5"}),
    "train": ("train", {"data_md5", "text_encoder", "train_nodes", "train_gpus", "pod_gpus", "cluster_namespace",
                        "cluster_cuda_image", "cluster_train_cpu", "cluster_train_memory", "cluster_trainer_runtime",
                        "cluster_gpu_node_selector", "cluster_gpu_tolerations", "cluster_shared_pvc",
                        "cluster_trainjob_timeout_s"}),
    "evaluate": ("evaluate", {"data_md5"}),
    "package_model": ("package", {"data_md5", *STEP_CONFIGS["index"].leaves()}),
    "check_drift": ("drift", {"data_md5", "reference_uri"}),
    "drift_profile": ("profile", {"data_md5"}),
}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return list(yaml.safe_load_all(training.COMPILED.read_text(encoding="utf-8")))


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_parameters_are_exactly_its_steps_settings(name):
    from components import kfp_components

    config, extra = COMPONENTS[name]
    spec = getattr(kfp_components.build("img", "cuda-img"), name).component_spec
    parameters = {k for k, v in spec.inputs.items() if not v.type.startswith("system.")}
    assert parameters - extra == set(STEP_CONFIGS[config].leaves()), name
    assert extra <= parameters


def test_compiled_pipeline_is_up_to_date(tmp_path):
    fresh = training.compile_pipeline(load_params(), tmp_path / "p.yaml", training.data_md5(REPO / "data.dvc"))
    assert fresh.read_text() == training.COMPILED.read_text(), \
        "pipelines/training.yaml is stale: run `cacara pipeline compile` and commit it"


def test_pipeline_parameters_mirror_params_yaml(compiled):
    params = load_params()
    declared = compiled[0]["root"]["inputDefinitions"]["parameters"]
    expected = training.pipeline_defaults(params, training.data_md5(REPO / "data.dvc"))
    assert set(declared) == set(expected)
    for name, value in expected.items():
        assert declared[name].get("defaultValue") == value, name
    assert expected["train_epochs"] == params["train"]["epochs"] and expected["data_md5"]


def _executor(compiled: list[dict], task: str) -> dict:
    spec = compiled[0]
    component = spec["root"]["dag"]["tasks"].get(task) or next(
        t for c in spec["components"].values() for t in c.get("dag", {}).get("tasks", {}).values()
        if t["taskInfo"]["name"] == task)
    executor = spec["components"][component["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][executor]["container"]


def _task(compiled: list[dict], name: str) -> dict:
    for component in [compiled[0]["root"], *compiled[0]["components"].values()]:
        for task in component.get("dag", {}).get("tasks", {}).values():
            if task["taskInfo"]["name"] == name:
                return task
    raise KeyError(name)


def test_train_tasks_request_gpus_cpu_memory_on_the_gpu_pool(compiled):
    cluster = load_params()["cluster"]
    for name in ("train", "train-english-only"):
        container = _executor(compiled, name)
        assert container["image"] == cluster["cuda_image"]
        accelerator = container["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert "launcher-gpus" in accelerator["resourceCount"]  # a parameter: the GPUs per node, 0 for a TrainJob
        assert container["resources"]["resourceCpuLimit"] == cluster["train_cpu"]
        assert container["resources"]["resourceMemoryLimit"] == cluster["train_memory"]
        assert container["resources"]["resourceCpuRequest"] == cluster["train_cpu"]
    platform = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for executor in ("exec-train", "exec-train-2"):
        assert platform[executor]["nodeSelector"]["labels"] == cluster["gpu_node_selector"]
        assert platform[executor]["tolerations"] == cluster["gpu_tolerations"]
    assert _executor(compiled, "evaluate")["image"] == cluster["image"]
    assert "accelerator" not in _executor(compiled, "evaluate")["resources"]


def test_images_come_from_the_settings_the_pipeline_is_compiled_with(tmp_path):
    params = load_params(overrides={"cluster.image": "registry.example/team/cacara:9.9",
                                    "cluster.cuda_image": "registry.example/team/cacara-cuda:9.9"})
    spec = list(yaml.safe_load_all(training.compile_pipeline(params, tmp_path / "p.yaml").read_text()))
    images = {e["container"]["image"] for e in spec[0]["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/team/cacara:9.9", "registry.example/team/cacara-cuda:9.9"}
    assert _executor(spec, "train")["image"] == "registry.example/team/cacara-cuda:9.9"


def test_remote_reads_retry_with_backoff_and_take_credentials_from_a_secret(compiled):
    cluster = load_params()["cluster"]
    policy = _task(compiled, "ingest-shard")["retryPolicy"]
    assert policy == {"maxRetryCount": cluster["retries"], "backoffDuration": cluster["retry_backoff"],
                      "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}
    secret = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-ingest-shard"]["secretAsEnv"]
    assert secret[0]["secretName"] == cluster["storage_secret"]
    assert {m["envVar"] for m in secret[0]["keyToEnv"]} == set(cluster["storage_secret_keys"])
    text = training.COMPILED.read_text()
    assert "secretKeyRef" not in text and "AWS_SECRET_ACCESS_KEY:" not in text  # names only, no values


def test_every_step_is_cached_and_keyed_to_the_data(compiled):
    for name in ("ingest-shard", "merge-shards", "validate-dataset", "embed-text", "train", "evaluate"):
        task = _task(compiled, name)
        assert task["cachingOptions"] == {"enableCache": True}, name
        assert "data_md5" in task["inputs"]["parameters"], name


def test_validation_gates_everything_downstream(compiled):
    assert "validate-dataset" in _task(compiled, "embed-text")["dependentTasks"]


def test_ingest_fans_out_over_shards_and_merges(compiled):
    root = compiled[0]["root"]["dag"]["tasks"]
    name, loop = next((k, t) for k, t in root.items() if t.get("parameterIterator"))
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("shard-indices-Output")
    assert loop["taskInfo"]["name"] == "ingest-shards"
    merge = root["merge-shards"]["inputs"]["artifacts"]["shards"]
    assert merge["taskOutputArtifact"]["producerTask"] == name


def _route_kfp(request):
    if request.method == "GET" and request.path == "/apis/v2beta1/experiments":
        return Answer(200, {})
    if request.method == "POST" and request.path == "/apis/v2beta1/experiments":
        return Answer(200, {"experiment_id": "exp-1", "display_name": request.json()["display_name"]})
    if request.method == "POST" and request.path == "/apis/v2beta1/runs":
        return Answer(200, {"run_id": "run-42", "display_name": request.json()["display_name"]})
    return Answer(404, {"error": "not found", "code": 5})


def test_submit_sends_the_compiled_pipeline_and_every_parameter(monkeypatch):
    from pipelines.submit import submit

    monkeypatch.setenv("KF_PIPELINES_TOKEN", "token-from-env")
    params = load_params(overrides={"train.epochs": 7})
    with Loopback(_route_kfp) as server:
        result = submit(params, server.url, md5="0123abcd", run_name="nightly", experiment="cacara-tests",
                        source="s3://bucket/clotho/")
    assert result.run_id == "run-42"
    get, create_experiment, create_run = server.requests
    assert get.query["namespace"] == [params["cluster"]["namespace"]]
    assert create_experiment.json()["display_name"] == "cacara-tests"
    assert all(r.headers.get("authorization") == "Bearer token-from-env" for r in server.requests)
    run = create_run.json()
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    sent = run["runtime_config"]["parameters"]
    assert sent["train_epochs"] == 7 and sent["data_md5"] == "0123abcd" and sent["source_uri"] == "s3://bucket/clotho/"
    assert set(sent) == set(training.pipeline_defaults(params))
    assert run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == training.PIPELINE_NAME
    assert "token-from-env" not in json.dumps(run)


def test_submit_refuses_bad_settings_before_sending_anything():
    from pipelines.submit import submit

    with Loopback(_route_kfp) as server:
        with pytest.raises(ConfigError, match="train.epochs: Input should be greater than or equal to 1"):
            submit(load_params(overrides={"train.epochs": -1}), server.url, md5="x")
    assert server.requests == []


def test_submit_says_clearly_when_the_api_refuses_or_is_unreachable():
    from pipelines.submit import SubmitError, submit

    def forbidden(request):
        return Answer(403, {"error": "user is not authorized to create runs", "code": 7})

    with Loopback(forbidden) as server:
        with pytest.raises(SubmitError, match="refused the run: HTTP 403.*not authorized"):
            submit(load_params(), server.url, md5="x")
    with pytest.raises(SubmitError, match="cannot reach Kubeflow Pipelines"):
        submit(load_params(), f"http://127.0.0.1:{closed_port()}", md5="x")
    with pytest.raises(SubmitError, match="no Kubeflow Pipelines host"):
        submit(load_params(), None, md5="x")


# ---- the whole pipeline in kfp.local against dvc repro, on the same real clips and settings ----------

LOCAL_OVERRIDES = {"model.text_encoder": "use-multilingual", "train.epochs": 2, "train.batch_size": 8,
                   "train.warmup_epochs": 1, "evaluate.chance_draws": 2, "evaluate.min_captions": 1,
                   "evaluate.bootstrap_draws": 200, "validate.split_tolerance": 1.0,
                   "package.min_val_gain": -100.0,  # two epochs on 20 clips: the gate is tested in test_package
                   "drift.policy": "warn"}  # 36 clips: the drift gate is tested in test_drift


@pytest.mark.slow
def test_run_local_gives_the_metrics_dvc_repro_gives(tmp_path):
    """Same clips, same params: kfp.local (2 ingest shards, fresh folders per task) and `dvc repro`
    (one shard, outputs reused in place) must report the same metrics: every value equal to the JSON's
    3 decimals (measured: identical files)."""
    # Evidently's embeddings drift needs 32 clips over both sides: 20 train (the reference) + 16 held out.
    source = demo_subset(tmp_path / "src", {"train": 20, "val": 8, "test": 8})
    params = load_params(overrides=LOCAL_OVERRIDES)
    training.run_local(params, tmp_path / "kfp", source, md5="subset", ingest_shards=2)
    kfp_metrics = sorted((tmp_path / "kfp").glob("*/evaluate/reports/metrics.json"))
    assert len(kfp_metrics) == 1

    project = tmp_path / "dvc"
    project.mkdir()
    for name in ("cacara", "components", "model"):
        (project / name).symlink_to(REPO / name)
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    tree = load_params(overrides={**LOCAL_OVERRIDES, "data.source": str(source)})
    (project / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "CACARA_WEIGHTS_DIR": str(REPO / "work" / "weights")}
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=project, env=env, check=True)
    proc = subprocess.run([dvc, "repro"], cwd=project, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    dvc_metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    assert json.loads(kfp_metrics[0].read_text()) == dvc_metrics
    assert (project / "work" / "dataset" / "manifest.jsonl").read_bytes() == \
        next((tmp_path / "kfp").glob("*/merge-shards/dataset/manifest.jsonl")).read_bytes()
    # The package task leaves the model and the Bento as archives, recorded by sha256.
    bento = next((tmp_path / "kfp").glob("*/package-model/bento"))
    record = json.loads((bento / "package.json").read_text())
    from model.weights_cache import sha256_file

    assert record["archives"] == {n: sha256_file(bento / n) for n in ("model.bentomodel", "cacara-search.bento")}
    assert record["data_md5"] == "subset" and record["quality_gate"]["min_gain"] == -100.0
    dvc_record = json.loads((project / "work" / "package" / "package.json").read_text())
    assert dvc_record["quality_gate"] == record["quality_gate"]


def test_flat_parameters_cover_every_setting_a_step_reads():
    flat = flat_params(load_params())
    for name, config in STEP_CONFIGS.items():
        assert set(config.leaves()) <= set(flat), name
        assert config.from_leaves(flat) == config.from_params(load_params()), name


def test_a_failed_validation_stops_the_run_before_training(tmp_path):
    """kfp.local runs the real validate task; a critical failure (here: split shares far from the
    configured fractions) fails it with the step's message and nothing downstream runs."""
    source = demo_subset(tmp_path / "src", {"train": 6, "val": 2, "test": 2})
    params = load_params(overrides={**LOCAL_OVERRIDES, "validate.split_tolerance": 0.0})
    with pytest.raises(RuntimeError, match="Inner task failed: .*validate-dataset"):
        training.run_local(params, tmp_path / "kfp", source, md5="subset")
    report = json.loads(next((tmp_path / "kfp").glob("*/validate-dataset/reports/validation.json")).read_text())
    assert report["success"] is False and "split_fractions" in report["failed_critical"]
    assert not list((tmp_path / "kfp").glob("*/train*")) and not list((tmp_path / "kfp").glob("*/embed-text*"))


def test_a_drifted_dataset_stops_the_run_before_training(tmp_path, packaged):
    """kfp.local runs the real check-drift task against a model's drift reference (the `packaged` model's,
    given as ``drift_reference_uri``): the same demo clips 30 dB quieter fail it, naming the columns, and
    neither caption embedding nor training runs."""
    import numpy as np
    import soundfile as sf

    source = demo_subset(tmp_path / "src", {"train": 6, "val": 8, "test": 8})
    for path in (source / "audio").iterdir():
        wave, rate = sf.read(str(path), dtype="float32")
        sf.write(str(path), wave * np.float32(10 ** (-30 / 20)), rate)
    params = load_params(overrides={**LOCAL_OVERRIDES, "drift.policy": "fail"})
    with pytest.raises(RuntimeError, match="Inner task failed: .*check-drift"):
        training.run_local(params, tmp_path / "kfp", source, md5="quiet",
                           drift_reference_uri=str(packaged.drift_reference))
    summary = json.loads(next((tmp_path / "kfp").glob("*/check-drift/reports/drift.json")).read_text())
    assert not summary["passed"] and "rms_dbfs" in summary["drifted"]
    html = next((tmp_path / "kfp").glob("*/check-drift/report"))
    assert "window.drawDashboard(" in html.read_text(encoding="utf-8"), "the HTML artifact is the Evidently report"
    assert not list((tmp_path / "kfp").glob("*/train*")) and not list((tmp_path / "kfp").glob("*/embed-text*"))
