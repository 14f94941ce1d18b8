"""Load on loopback: the served Bento under locust (headless), adaptive batching on and off, side by side.

What it measures, in one run, on this machine's loopback:

* throughput (requests/s), p50 and p99 latency and failures (count and HTTP statuses) of ``embed_text``
  (one caption per request), ``embed_audio`` (one 10-s clip per request) and ``search`` (k=5) at 1, 8 and
  32 concurrent closed-loop users (locust ``FastHttpUser``, no wait: each user sends its next request
  when the last one is answered), each cell a bounded run (warm-up not recorded, then a fixed window and
  a request cap), with adaptive batching on (the packaged model as is) and off;
* the service's memory: the RSS summed over the serving process and its children (``bentoml serve`` runs
  an arbiter process and one worker), at idle after start-up, after one request of each endpoint, the
  peak sampled during each load cell, and at idle after the load (PSS too at idle, which counts pages
  shared between the two processes once);
* the bare model in this process (``load_embedder`` on the packaged model folder, as the service loads it)
  on the same 10-s file
  (``embed_audio_files``, decoding included, as the service decodes each upload) and on one caption
  (``embed_texts``), against the service's p50 at concurrency 1.

Batching on and off: two services run at once, each in its own session, started by this script and
stopped by killing its process group, both with ``CACARA_BENTO_MODEL=<model_tag>``, each from its own
temporary BentoML home (the project's ``work/bentoml`` is only read; a ``bentoml serve`` empties its home's
``prometheus_multiproc_dir`` on start, blanking the /metrics of other services of that home). "On" is the
packaged Bento as is, byte copies of it and its model: ``bentoml serve <bento_tag>``, what ``cacara serve
--package work/package`` execs (cacara/cli.py cmd_serve). "Off" is the same Bento from a copy of the
model in which ``metadata["serve"]["max_batch_size"]`` is 1: the service reads its limits from there at
import, declares ``embed_text`` without batching (each request on its own) and its own ``Batcher`` of
``embed_audio`` runs batches of one (``ServeSection.batching``). The script checks each service's
``/info`` for the limit it expects. Cells alternate between the two services (on first, then off first),
so machine load that drifts during the run hits both alike; the idle one takes no CPU. Before each cell
it waits (within a budget) until other jobs use at most ``--max-other-cores``, re-runs a cell they shared
once, and writes who used the CPUs during each cell.

Targets (from the issue), checked and written, never asserted: batching at least doubles embed_text
throughput at concurrency 32; at concurrency 1 the service adds at most 30% to the bare model's time for
a 10-s clip. Results: benchmarks/results/serving_load.md.

    .venv/bin/python benchmarks/serving_load.py            # ~10 minutes on 2 cores
    .venv/bin/python benchmarks/serving_load.py --quick    # smoke run, ~3 minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("CACARA_WEIGHTS_DIR", str(REPO / "work" / "weights"))
os.environ.setdefault("BENTOML_HOME", str(REPO / "work" / "bentoml"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from benchmarks.machine import machine_line  # noqa: E402

logger = logging.getLogger("serving_load")

MODEL_ENV = "CACARA_BENTO_MODEL"
RATE = 16000
CLIP_SECONDS = 10.0
ENDPOINTS = ("embed_text", "embed_audio", "search")
LOCUSTFILE = REPO / "benchmarks" / "locustfile.py"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "serving_load.md"
#: Captions and queries come in these languages (first caption of each clip in each), interleaved.
LANGUAGES = ("en", "de", "fr", "es", "pt-BR", "ru", "ja", "zh-CN", "ar", "hi", "tr", "vi")
SEARCH_QUERIES = ("a dog barking", "ein Hund bellt", "un chat qui miaule", "el canto de un pájaro",
                  "água corrente", "звонит телефон", "雨の音", "汽车喇叭", "طائر يغني", "घंटी बज रही है",
                  "bir kapı çarpıyor", "tiếng chuông")


# ------------------------------------------------------------------------------------------ inputs

def payload(dataset: Path, folder: Path, clips: int) -> dict:
    """Captions and queries in several languages, and ``clips`` 10-s 16 kHz WAVs of real audio: demo
    clips decoded at 16 kHz and concatenated (each file starting at a different clip) to exactly 10 s."""
    import soundfile as sf

    from cacara.audio import decode

    rows = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    texts = []
    for i, row in enumerate(rows):
        for lang in LANGUAGES[i % len(LANGUAGES):] + LANGUAGES[:i % len(LANGUAGES)]:
            if row["captions"].get(lang):
                texts.append(row["captions"][lang][0])
                break
    queries = list(SEARCH_QUERIES) + texts[::7]
    waves = [decode(dataset / row["audio_path"], RATE).samples for row in rows]
    need = int(CLIP_SECONDS * RATE)
    paths = []
    for c in range(clips):
        parts, total, j = [], 0, c * max(1, len(waves) // max(clips, 1))
        while total < need:
            w = waves[j % len(waves)]
            parts.append(w)
            total += len(w)
            j += 1
        path = folder / f"clip{c:02d}_10s.wav"
        sf.write(str(path), np.concatenate(parts)[:need], RATE, subtype="PCM_16")
        paths.append(str(path))
    languages = sorted({lang for row in rows for lang in row["captions"]})
    return {"texts": texts, "queries": queries, "audio": paths, "languages_in_corpus": len(languages)}


# ---------------------------------------------------------------------------------------- services

#: Captions per call in the bare tower's batched timing: what BentoML's batches at 32 users hold at most.
TOWER_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_store(home: Path, tags: list[str], kind: str, target: Path) -> Path:
    """Byte copies of store entries (``kind`` "models" or "bentos") into the BentoML home ``target``."""
    for tag in tags:
        name, version = tag.split(":")
        dst = target / kind / name / version
        shutil.copytree(home / kind / name / version, dst)
        (dst.parent / "latest").write_text(version)
    return target


def batching_on_home(home: Path, model_tag: str, bento_tag: str, target: Path) -> Path:
    """A private BentoML home with byte copies of the packaged model and Bento. Each ``bentoml serve``
    empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, which blanks the /metrics of any
    other service running from the same home: served from the project's home, this benchmark and anyone
    else's service there (tests, ``make serve``) would clobber each other's metrics."""
    copy_store(home, [model_tag], "models", target)
    return copy_store(home, [bento_tag], "bentos", target)


def batching_off_home(home: Path, model_tag: str, bento_tag: str, target: Path) -> Path:
    """A private BentoML home with the same Bento and a copy of the packaged model whose serve limits say
    ``max_batch_size: 1`` (the project's home is only read): the service reads its limits from the model
    when it starts, and with 1 it declares ``embed_text`` without batching and its ``Batcher`` runs
    ``embed_audio`` one upload at a time (ServeSection.batching)."""
    import yaml

    name, version = model_tag.split(":")
    batching_on_home(home, model_tag, bento_tag, target)
    dst = target / "models" / name / version
    info = yaml.safe_load((dst / "model.yaml").read_text())
    info["metadata"]["serve"]["max_batch_size"] = 1
    (dst / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False, allow_unicode=True))
    record_file = dst / "package.json"
    if record_file.exists():  # the package record repeats the limits: kept consistent
        record = json.loads(record_file.read_text())
        if "serve" in record:
            record["serve"]["max_batch_size"] = 1
            record_file.write_text(json.dumps(record, indent=1, sort_keys=True))
    return target


@dataclass
class Service:
    label: str
    home: Path
    target: str  # what `bentoml serve` is given: a Bento tag or a module:Service import string
    model_tag: str
    log: Path
    proc: subprocess.Popen | None = None
    port: int = 0
    url: str = ""
    ready_s: float = 0.0
    info: dict = field(default_factory=dict)

    def start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        bentoml = shutil.which("bentoml") or str(Path(sys.executable).parent / "bentoml")
        env = {**os.environ, "BENTOML_HOME": str(self.home), MODEL_ENV: self.model_tag}
        start = time.monotonic()
        argv = [bentoml, "serve", self.target, "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("wb") as out:
            # For the Bento: what `cacara serve --package work/package` execs (cacara/cli.py cmd_serve).
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         cwd=self.log.parent, start_new_session=True)
        deadline = start + 240
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label}: bentoml serve exited with {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label}: not ready after 240 s:\n{self.log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.25)
        self.ready_s = time.monotonic() - start
        with urllib.request.urlopen(self.url + "/info", timeout=30) as r:
            self.info = json.loads(r.read())
        logger.info("%s: ready in %.1f s on %s (limits %s)", self.label, self.ready_s, self.url, self.info.get("limits"))

    def processes(self) -> list[psutil.Process]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for p in self.processes():
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def memory(self) -> dict[str, float]:
        """RSS and PSS summed over the process tree, and the process count (PSS reads smaps: idle only)."""
        rss = pss = 0
        procs = self.processes()
        for p in procs:
            try:
                full = p.memory_full_info()
                rss, pss = rss + full.rss, pss + getattr(full, "pss", 0)
            except psutil.Error:
                pass
        return {"rss_mb": rss / 2**20, "pss_mb": pss / 2**20, "processes": len(procs)}

    def post(self, path: str, body: bytes, content_type: str) -> int:
        request = urllib.request.Request(self.url + path, data=body, method="POST",
                                         headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                r.read()
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code

    def metric_sums(self, metric: str, **labels: str) -> tuple[float, float]:
        """(sum, count) of a Prometheus histogram over the series with these labels, from /metrics (0, 0
        when absent)."""
        try:
            with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return 0.0, 0.0
        out = {"sum": 0.0, "count": 0.0}
        for line in text.splitlines():
            m = re.match(rf'{metric}_(sum|count)\{{(.*)\}} ([0-9.eE+-]+)$', line)
            if m and all(f'{k}="{v}"' in m.group(2) for k, v in labels.items()):
                out[m.group(1)] += float(m.group(3))
        return out["sum"], out["count"]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 1500) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        except ProcessLookupError:
            pass


class ServiceDied(RuntimeError):
    pass


class MemorySampler(threading.Thread):
    """RSS of each service's process tree every ``period_s``; ``peak(label)`` since the last ``reset``."""

    def __init__(self, services: list[Service], period_s: float = 0.25):
        super().__init__(daemon=True)
        self.services, self.period_s = services, period_s
        self._peaks: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            for s in self.services:
                rss = s.rss_mb()
                with self._lock:
                    self._peaks[s.label] = max(self._peaks.get(s.label, 0.0), rss)
            self._stop.wait(self.period_s)

    def reset(self) -> None:
        with self._lock:
            self._peaks.clear()

    def peak(self, label: str) -> float:
        with self._lock:
            return self._peaks.get(label, 0.0)

    def stop(self) -> None:
        self._stop.set()


# ------------------------------------------------------------------------------------------- cells

@dataclass
class Cell:
    endpoint: str
    users: int
    batching: str
    window_s: float
    ok: int
    failed: int
    statuses: dict[str, int]
    errors: dict[str, int]
    p50_ms: float
    p99_ms: float
    mean_ms: float
    peak_rss_mb: float
    load1: float
    mean_batch: float | None = None
    cpu: dict[str, float] = field(default_factory=dict)  # cores used over the whole locust run, by whom
    server_mean_ms: float | None = None  # BentoML's own request duration histogram, successful requests
    note: str = ""

    @property
    def rps(self) -> float:
        return self.ok / self.window_s if self.window_s > 0 else 0.0


def others_cores(services: list[Service], probe_s: float = 2.0) -> float:
    """Cores that other jobs (not the services, not this process) used over ``probe_s``."""
    import resource

    def now() -> tuple[float, float]:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
        ours = 0.0
        for s in services:
            for p in s.processes():
                try:
                    c = p.cpu_times()
                    ours += c.user + c.system
                except psutil.Error:
                    pass
        me = resource.getrusage(resource.RUSAGE_SELF)
        return busy, ours + me.ru_utime + me.ru_stime

    b0, o0 = now()
    t0 = time.monotonic()
    time.sleep(probe_s)
    b1, o1 = now()
    return max(0.0, (b1 - b0) - (o1 - o0)) / (time.monotonic() - t0)


def wait_quiet(services: list[Service], max_other: float, max_wait_s: float) -> tuple[float, float]:
    """Probe until other jobs use at most ``max_other`` cores, or ``max_wait_s`` ran out: (waited, last)."""
    start = time.monotonic()
    while True:
        other = others_cores(services)
        waited = time.monotonic() - start
        if other <= max_other:
            return waited, other
        if waited >= max_wait_s:
            logger.warning("other jobs still use %.2f cores after %.0f s: measuring anyway", other, waited)
            return waited, other
        logger.info("other jobs use %.2f cores (> %.2f): waiting", other, max_other)


def cpu_split(service: Service) -> dict[str, float]:
    """CPU seconds so far: the whole machine's busy time, the service's process tree, the finished
    children of this process (the locust runs) and this process itself; and a wall clock."""
    import resource

    t = psutil.cpu_times()
    busy = sum(t) - t.idle - getattr(t, "iowait", 0.0)
    svc = 0.0
    for p in service.processes():
        try:
            c = p.cpu_times()
            svc += c.user + c.system
        except psutil.Error:
            pass
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    me = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall": time.monotonic(), "busy": busy, "service": svc, "locust": kids.ru_utime + kids.ru_stime,
            "benchmark": me.ru_utime + me.ru_stime}


def run_cell(service: Service, endpoint: str, users: int, payload_file: Path, folder: Path, warmup_s: float,
             cell_s: float, max_requests: int, sampler: MemorySampler) -> Cell:
    out = folder / f"cell_{endpoint}_{users}_{service.label}.json"
    env = {**os.environ, "CACARA_LOAD_ENDPOINT": endpoint, "CACARA_LOAD_PAYLOAD": str(payload_file),
           "CACARA_LOAD_WARMUP_S": str(warmup_s), "CACARA_LOAD_CELL_S": str(cell_s),
           "CACARA_LOAD_MAX": str(max_requests), "CACARA_LOAD_OUT": str(out)}
    locust = shutil.which("locust") or str(Path(sys.executable).parent / "locust")
    argv = [locust, "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users),
            "-t", f"{int(warmup_s + cell_s + 60)}s", "--host", service.url, "--only-summary",
            "--loglevel", "WARNING", "--exit-code-on-error", "0", "--stop-timeout", "0"]
    batch_metric, batch_labels = "bentoml_service_adaptive_batch_size", {"method_name": endpoint}
    duration_metric = "bentoml_service_request_duration_seconds"
    duration_labels = {"endpoint": f"/{endpoint}", "http_response_code": "200"}
    batch_before = service.metric_sums(batch_metric, **batch_labels)
    duration_before = service.metric_sums(duration_metric, **duration_labels)
    sampler.reset()
    cpu_before = cpu_split(service)
    result = subprocess.run(argv, env=env, cwd=folder, capture_output=True, text=True,
                            timeout=warmup_s + cell_s + 180)
    cpu = {k: v - cpu_before[k] for k, v in cpu_split(service).items()}
    peak = sampler.peak(service.label)
    if not service.alive():
        last = [line for line in service.log_tail().splitlines() if line.strip()][-1:] or ["(empty log)"]
        raise ServiceDied(f"{service.label}: the service exited (code {service.proc.returncode}) during {endpoint} "
                          f"c={users}, last log line: {last[0][:200]!r}\n{service.log_tail()}")
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"locust failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    data = json.loads(out.read_text())
    start, end = data["window_start"], data["window_end"]
    records = [r for r in data["records"] if start <= r[0] <= end]
    ok_ms = [r[1] for r in records if 200 <= r[2] < 300 and not r[3]]
    statuses: dict[str, int] = {}
    errors: dict[str, int] = {}
    for _, _, status, error in records:
        if 200 <= status < 300 and not error:
            continue
        statuses[str(status or "no response")] = statuses.get(str(status or "no response"), 0) + 1
        key = error.split(":")[0] if error else "?"
        errors[key] = errors.get(key, 0) + 1
    mean_batch = server_ms = None
    after = service.metric_sums(batch_metric, **batch_labels)
    if after[1] > batch_before[1]:
        mean_batch = (after[0] - batch_before[0]) / (after[1] - batch_before[1])
    after = service.metric_sums(duration_metric, **duration_labels)
    if after[1] > duration_before[1]:  # the whole locust run, warm-up included
        server_ms = 1000 * (after[0] - duration_before[0]) / (after[1] - duration_before[1])
    cell = Cell(endpoint, users, service.label, end - start, len(ok_ms), len(records) - len(ok_ms), statuses, errors,
                float(np.percentile(ok_ms, 50)) if ok_ms else float("nan"),
                float(np.percentile(ok_ms, 99)) if ok_ms else float("nan"),
                float(np.mean(ok_ms)) if ok_ms else float("nan"), peak, os.getloadavg()[0], mean_batch)
    cell.server_mean_ms = server_ms
    wall = cpu.pop("wall")
    busy = cpu.pop("busy")
    cell.cpu = {k: v / wall for k, v in cpu.items()}
    cell.cpu["others"] = max(0.0, busy - sum(cpu.values())) / wall
    logger.info("%-11s c=%2d batching %-3s  %7.1f req/s  p50 %7.1f ms  p99 %7.1f ms  failed %d %s  peak RSS %.0f MB%s",
                endpoint, users, service.label, cell.rps, cell.p50_ms, cell.p99_ms, cell.failed, statuses or "",
                peak, "" if mean_batch is None else f"  mean batch {mean_batch:.1f}")
    return cell


def bare_timing(fn, seconds: float, min_repeats: int = 10) -> list[float]:
    """Milliseconds per call of ``fn``, called back to back for about ``seconds`` (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline or len(times) < min_repeats:
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return times


# ------------------------------------------------------------------------------------------ report

def fmt_status(cell: Cell) -> str:
    if not cell.failed:
        return "0"
    return f"{cell.failed} (" + ", ".join(f"{k}: {v}" for k, v in sorted(cell.statuses.items())) + ")"


def render(meta: dict[str, str], cells: list[Cell], memory: list[tuple[str, str, dict]], bare: dict,
           targets: list[tuple[str, str, str]], notes: list[str]) -> str:
    lines = ["# Serving under load: locust on loopback, adaptive batching on and off", "",
             "Written by `benchmarks/serving_load.py` (locust users: `benchmarks/locustfile.py`). Closed loop: each "
             "of N locust users (`FastHttpUser`, no wait) sends its next request as soon as the last is answered. "
             "req/s = successful requests completed in the recorded window / its length; p50 and p99 over the "
             "successful requests of the window (exact times, not locust's rounded buckets). Both services ran "
             "at once, one loaded at a time, cells alternating between them. Nothing here is asserted on time.", "",
             *(f"- {k}: {v}" for k, v in meta.items()), "",
             "## Throughput and latency", "",
             "| endpoint | users | batching | req/s | p50 ms | p99 ms | mean ms | server mean ms | failures (HTTP "
             "status: count) | mean batch | requests | window s | cores: service / locust / others | load avg (1 min) "
             "| note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|---|"]
    for c in cells:
        batch = "" if c.mean_batch is None else f"{c.mean_batch:.1f}"
        server = "" if c.server_mean_ms is None else f"{c.server_mean_ms:.1f}"
        lines.append(f"| {c.endpoint} | {c.users} | {c.batching} | {c.rps:.1f} | {c.p50_ms:.1f} | {c.p99_ms:.1f} "
                     f"| {c.mean_ms:.1f} | {server} | {fmt_status(c)} | {batch} | {c.ok + c.failed} | {c.window_s:.1f} "
                     f"| {c.cpu.get('service', 0):.2f} / {c.cpu.get('locust', 0):.2f} / {c.cpu.get('others', 0):.2f} "
                     f"| {c.load1:.2f} | {c.note} |")
    lines += ["", "server mean: BentoML's `bentoml_service_request_duration_seconds` histogram (from `/metrics`), "
              "successful requests of the whole locust run (warm-up included): the time inside the service, from "
              "the request reaching its HTTP server to the answer; the rest of the client's time is loopback "
              "transfer and locust itself. ", "mean batch: BentoML's `bentoml_service_adaptive_batch_size` histogram (from `/metrics`) over the "
              "cell, embed_text only (the service's own `Batcher` of embed_audio exports no metric; with batching "
              "off embed_text is not a batchable API, so there is no histogram). cores: CPU seconds per second over "
              "the whole locust run (warm-up included) used by the service's process tree, by locust, and by "
              "everything else on the machine (other jobs); the machine has " + str(os.cpu_count()) + ".", "",
              "Side by side (batching on / off):", "",
              "| endpoint | users | req/s on | req/s off | on/off | p50 on | p50 off | p99 on | p99 off |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    by = {(c.endpoint, c.users, c.batching): c for c in cells}
    for (endpoint, users, mode), on in by.items():
        off = by.get((endpoint, users, "off"))
        if mode != "on" or off is None:
            continue
        ratio = on.rps / off.rps if off.rps else float("nan")
        lines.append(f"| {endpoint} | {users} | {on.rps:.1f} | {off.rps:.1f} | {ratio:.2f} | {on.p50_ms:.1f} "
                     f"| {off.p50_ms:.1f} | {on.p99_ms:.1f} | {off.p99_ms:.1f} |")
    lines += ["", "## Memory of the service", "",
              "RSS summed over the `bentoml serve` process and its children (an arbiter and one worker); PSS "
              "counts pages the two share once (read at idle only). Peaks are sampled every 0.25 s during each cell.",
              "", "| batching | when | RSS MB | PSS MB | processes |", "|---|---|---:|---:|---:|"]
    for label, when, m in memory:
        pss = f"{m['pss_mb']:.0f}" if m.get("pss_mb") else ""
        procs = str(m.get("processes", ""))
        lines.append(f"| {label} | {when} | {m['rss_mb']:.0f} | {pss} | {procs} |")
    peaks = {}
    for c in cells:
        peaks.setdefault((c.batching, c.endpoint), []).append(c)
    lines += ["", "| batching | endpoint | peak RSS MB under load: 1 / 8 / 32 users |", "|---|---|---|"]
    for (mode, endpoint), cs in peaks.items():
        lines.append(f"| {mode} | {endpoint} | " + " / ".join(f"{c.peak_rss_mb:.0f}" for c in cs) + " |")
    lines += ["", "## Bare model against the service at concurrency 1", "",
              "The packaged model folder loaded in the benchmark process as the service loads it (`cacara.serving.load_embedder`), each call timed back to "
              "back, in blocks just before and after the service's concurrency-1 cells of the same endpoint.", "",
              "| what | bare model median ms [p10, p90] | calls | batching | client p50 ms | ratio | server mean ms "
              "| other jobs' cores in the cell |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, row in bare.items():
        for mode in ("on", "off"):
            c = row[mode]
            server = "" if c.server_mean_ms is None else f"{c.server_mean_ms:.1f}"
            lines.append(f"| {name} | {row['median']:.1f} [{row['p10']:.1f}, {row['p90']:.1f}] | {row['n']} | {mode} "
                         f"| {c.p50_ms:.1f} | {c.p50_ms / row['median']:.2f} | {server} | {c.cpu.get('others', 0):.2f} |")
    lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {ok} |" for t, m, ok in targets]
    lines += ["", "## Notes", "", *(f"- {n}" for n in notes), ""]
    return "\n".join(lines)


def code_provenance(bento_tag: str) -> dict[str, str]:
    """Which service code runs. In a checkout with cacara installed editable, ``bentoml serve <bento>``
    imports the checkout's ``cacara`` (its CLI imports the name as a module first), not the Bento's copy."""
    import hashlib

    import bentoml

    bento_src = Path(bentoml.bentos.get(bento_tag).path) / "src"
    out = {}
    for rel in ("cacara/service.py", "cacara/serving.py"):
        here = REPO / rel
        digest = hashlib.sha256(here.read_bytes()).hexdigest()[:12] if here.exists() else "missing"
        same = here.exists() and (bento_src / rel).exists() and (bento_src / rel).read_bytes() == here.read_bytes()
        out[rel] = f"checkout sha256 {digest}, {'same as' if same else 'differs from'} the Bento's copy"
    out["cacara/static/search.html in the Bento"] = "yes" if (bento_src / "cacara/static/search.html").exists() else "no"
    return out


def versions() -> str:
    from importlib.metadata import version

    names = ("bentoml", "locust", "onnxruntime", "numpy", "uvicorn", "starlette")
    return ", ".join(f"{n} {version(n)}" for n in names) + f", Python {platform.python_version()}"


# -------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--package", type=Path, default=REPO / "work" / "package", help="holds package.json")
    ap.add_argument("--dataset", type=Path, default=REPO / "work" / "dataset", help="manifest.jsonl and audio/")
    ap.add_argument("--users", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--endpoints", nargs="+", default=list(ENDPOINTS), choices=ENDPOINTS)
    ap.add_argument("--warmup-s", type=float, default=4.0, help="load before each cell's window, not recorded")
    ap.add_argument("--cell-s", type=float, default=20.0, help="recorded window per cell")
    ap.add_argument("--max-requests", type=int, default=20000, help="a cell's window ends early after this many")
    ap.add_argument("--bare-s", type=float, default=5.0, help="seconds per block of bare-model timing")
    ap.add_argument("--clips", type=int, default=8, help="distinct 10-s clips the embed_audio users send")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1-s warm-up, 4-s cells, 2-s bare blocks")
    ap.add_argument("--max-other-cores", type=float, default=0.25,
                    help="a quiet machine: other jobs use at most this many cores (measured over 2 s)")
    ap.add_argument("--first-wait-s", type=float, default=180.0, help="wait at most this long for quiet before the cells")
    ap.add_argument("--quiet-budget-s", type=float, default=240.0,
                    help="seconds, over the whole run, to spend waiting for quiet before cells and re-running a cell "
                         "that other jobs shared (more than --max-other-cores); 0: never")
    ap.add_argument("--no-wait", action="store_true", help="never wait for quiet nor re-run (--quick implies it)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, raw requests)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    if args.quick:
        args.warmup_s, args.cell_s, args.bare_s, args.no_wait = 1.0, 4.0, 2.0, True
    if max(args.users) > 32:
        logger.warning("more than 32 users: expect 429s (the service's max_concurrency)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM, and SIGINT even when started in the background (where it is ignored), stop the services too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = time.monotonic()
    load_start = os.getloadavg()

    import bentoml

    from cacara.serving import load_embedder
    from model.inference import inference_threads

    record = json.loads((args.package / "package.json").read_text())
    model_tag, bento_tag = record["model_tag"], record["bento_tag"]
    home = Path(os.environ["BENTOML_HOME"]).resolve()
    stored = bentoml.models.get(model_tag)
    serve_limits = dict(stored.info.metadata["serve"])
    code = code_provenance(bento_tag)
    tmp = Path(tempfile.mkdtemp(prefix="serving_load_"))
    services: list[Service] = []
    sampler: MemorySampler | None = None
    try:
        data = payload(args.dataset, tmp, args.clips)
        payload_file = tmp / "payload.json"
        payload_file.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        off_home = batching_off_home(home, model_tag, bento_tag, tmp / "batching_off" / "bentoml_home")
        on_home = batching_on_home(home, model_tag, bento_tag, tmp / "batching_on" / "bentoml_home")
        on = Service("on", on_home, bento_tag, model_tag, tmp / "serve_on.log")
        off = Service("off", off_home, bento_tag, model_tag, tmp / "serve_off.log")
        services = [on, off]
        memory: list[tuple[str, str, dict]] = []
        for s, expected in ((on, serve_limits["max_batch_size"]), (off, 1)):
            s.start()
            got = s.info.get("limits", {}).get("max_batch_size")
            if got != expected:
                raise RuntimeError(f"{s.label}: /info says max_batch_size {got}, expected {expected}")
        time.sleep(3)
        for s in services:
            memory.append((s.label, f"idle after start-up (ready in {s.ready_s:.1f} s, no request yet)", s.memory()))
        # One request of each endpoint (the text encoder loads on the first text), then idle again.
        audio_body = Path(data["audio"][0]).read_bytes()
        boundary = "cacarawarm"
        multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"a.wav\"\r\n"
                     f"Content-Type: audio/wav\r\n\r\n").encode() + audio_body + f"\r\n--{boundary}--\r\n".encode()
        for s in services:
            codes = [s.post("/embed_text", json.dumps({"texts": [data["texts"][0]]}).encode(), "application/json"),
                     s.post("/embed_audio", multipart, f"multipart/form-data; boundary={boundary}"),
                     s.post("/search", json.dumps({"query": data["queries"][0], "k": 5}).encode(), "application/json")]
            if codes != [200, 200, 200]:
                raise RuntimeError(f"{s.label}: warm-up requests answered {codes}; log: {s.log}")
        time.sleep(3)
        for s in services:
            memory.append((s.label, "idle after one request of each endpoint", s.memory()))

        embedder = load_embedder(Path(stored.path) / "model")  # as the service loads it
        clip = Path(data["audio"][0])
        text = data["texts"][0]
        bare_fns = {"embed_audio": ("10-s clip: `embed_audio_files([clip])`, decoding included",
                                    lambda: embedder.embed_audio_files([clip])),
                    "embed_text": ("one caption: `embed_texts([caption])`", lambda: embedder.embed_texts([text]))}
        bare_times: dict[str, list[float]] = {k: [] for k in bare_fns}
        tower_batch: list[float] = []

        first_wait, first_other = (0.0, others_cores(services)) if args.no_wait else \
            wait_quiet(services, args.max_other_cores, args.first_wait_s)
        load_cells = os.getloadavg()[0]
        budget = 0.0 if args.no_wait else args.quiet_budget_s
        sampler = MemorySampler(services)
        sampler.start()
        cells: list[Cell] = []
        incidents: list[str] = []
        order = 0
        for endpoint in args.endpoints:
            for users in args.users:
                pair = [on, off] if order % 2 == 0 else [off, on]
                order += 1
                bare = endpoint in bare_fns and users == 1
                if bare:
                    bare_times[endpoint] += bare_timing(bare_fns[endpoint][1], args.bare_s)
                    if endpoint == "embed_text":  # what the tower itself gains from a batch
                        tower_batch += bare_timing(lambda: embedder.embed_texts(data["texts"][:TOWER_BATCH]),
                                                   args.bare_s)
                for s in pair:
                    def once() -> Cell:
                        try:
                            return run_cell(s, endpoint, users, payload_file, tmp, args.warmup_s, args.cell_s,
                                            args.max_requests, sampler)
                        except ServiceDied as exc:  # said in the results; restarted and the cell run again, once
                            logger.error("%s", exc)
                            incidents.append(str(exc).splitlines()[0])
                            s.log = s.log.with_name(f"{s.log.stem}_restart{len(incidents)}.log")
                            s.start()
                            incidents[-1] += f"; restarted (ready in {s.ready_s:.1f} s) and the cell run again"
                            return run_cell(s, endpoint, users, payload_file, tmp, args.warmup_s, args.cell_s,
                                            args.max_requests, sampler)

                    if budget > 0:
                        waited, _ = wait_quiet(services, args.max_other_cores, min(budget, 60.0))
                        budget -= waited
                    cell = once()
                    if cell.cpu.get("others", 0.0) > args.max_other_cores and budget > 0:
                        t0 = time.monotonic()
                        first = cell.cpu["others"]
                        wait_quiet(services, args.max_other_cores, min(budget, 60.0))
                        again = once()
                        if again.cpu.get("others", 0.0) < first:  # keep the run other jobs shared least
                            cell = again
                            cell.note = f"re-run: other jobs took {first:.2f} cores during the first run"
                        else:
                            cell.note = (f"re-run kept the first run: other jobs took "
                                         f"{again.cpu.get('others', 0.0):.2f} cores during the second")
                        budget -= time.monotonic() - t0
                    cells.append(cell)
                if bare:
                    bare_times[endpoint] += bare_timing(bare_fns[endpoint][1], args.bare_s)
                    if endpoint == "embed_text":  # what the tower itself gains from a batch
                        tower_batch += bare_timing(lambda: embedder.embed_texts(data["texts"][:TOWER_BATCH]),
                                                   args.bare_s)
        sampler.stop()
        time.sleep(3)
        for s in services:
            memory.append((s.label, "idle after the load", s.memory()))
        load_end = os.getloadavg()
        logs = {p.name: p.read_text(errors="replace") for p in tmp.glob("serve_*.log")}
    finally:
        if sampler is not None:
            sampler.stop()
        for s in services:
            s.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    by = {(c.endpoint, c.users, c.batching): c for c in cells}
    bare_rows: dict[str, dict] = {}
    for endpoint, times in bare_times.items():
        if not times or (endpoint, 1, "on") not in by:
            continue
        bare_rows[bare_fns[endpoint][0]] = {
            "median": statistics.median(times), "p10": float(np.percentile(times, 10)),
            "p90": float(np.percentile(times, 90)), "n": len(times),
            "on": by[(endpoint, 1, "on")], "off": by[(endpoint, 1, "off")], "endpoint": endpoint}

    targets: list[tuple[str, str, str]] = []
    top = max(args.users)
    if ("embed_text", top, "on") in by:
        a, b = by[("embed_text", top, "on")], by[("embed_text", top, "off")]
        ratio = a.rps / b.rps if b.rps else float("nan")
        ceiling = ""
        if tower_batch and bare_times.get("embed_text"):
            one, per = statistics.median(bare_times["embed_text"]), statistics.median(tower_batch) / TOWER_BATCH
            ceiling = (f"; the bare tower: one caption {one:.1f} ms, {per:.1f} ms a caption in calls of {TOWER_BATCH}, "
                       f"so batching itself gains at most {one / per:.2f}x before any HTTP work")
        targets.append((f"batching at least doubles embed_text throughput at concurrency {top}",
                        f"{a.rps:.1f} req/s on / {b.rps:.1f} req/s off = **{ratio:.2f}x** (target >= 2){ceiling}",
                        "**yes**" if ratio >= 2 else "**no**"))
    for row in bare_rows.values():
        if row["endpoint"] != "embed_audio":
            continue
        on, off = row["on"], row["off"]
        ratio = on.p50_ms / row["median"]
        targets.append(("at concurrency 1 the service adds at most 30% to the bare model's time for a 10-s clip",
                        f"service p50 {on.p50_ms:.1f} ms (batching on, the packaged service) / bare model median "
                        f"{row['median']:.1f} ms = **{ratio:.2f}** (+{100 * (ratio - 1):.0f}%; target <= 1.30); "
                        f"batching off: {off.p50_ms:.1f} ms, {off.p50_ms / row['median']:.2f}",
                        "**yes**" if ratio <= 1.30 else "**no**"))

    failures = [c for c in cells if c.failed]
    shed = sum("server busy" in line.lower() or "status=503" in line for log in logs.values() for line in log.splitlines())
    notes = [
        "Batching on = the packaged Bento served as `cacara serve` serves it (`bentoml serve <bento_tag>`), "
        "from a private BentoML home holding byte copies of the Bento and its model: every `bentoml serve` "
        "empties `$BENTOML_HOME/prometheus_multiproc_dir` when it starts, so two services sharing a home blank "
        "each other's /metrics, and the project's `work/bentoml` is only read. Batching off = the same Bento, "
        "from another private home whose copy of the model has `metadata.serve.max_batch_size` 1: the service "
        "then declares embed_text without batching and its own `Batcher` runs embed_audio one upload at a time "
        "(`ServeSection.batching`). Each service's "
        f"`/info` was checked for its max_batch_size ({serve_limits['max_batch_size']} and 1).",
        f"Load generator and services share the same {os.cpu_count()} CPUs: locust's own CPU use (one process, "
        "gevent) is part of every figure, as is whatever else ran on the machine: the cores column says who used "
        "the CPUs during each cell. The 1-min load average is no measure of other jobs here: it counts the "
        "services' own runnable threads (BentoML's thread pool under 32 users), so it rises during the run "
        "with nothing else running.",
        "`search` is not batched in either service (one query embedded and searched per request): its two rows "
        "are a control for drift between the services.",
        "embed_audio uploads are 16 kHz 16-bit mono WAVs of 10 s (demo clips concatenated), "
        f"{len(data['audio'])} distinct files round-robin; embed_text sends one caption per request, "
        f"{len(data['texts'])} captions in {len(LANGUAGES)} languages round-robin; search sends k=5 queries in "
        "several languages.",
        (f"Failed requests in {len(failures)} cells: " + "; ".join(
            f"{c.endpoint} c={c.users} {c.batching}: {fmt_status(c)}" for c in failures)
         if failures else "No request failed in any recorded window."),
        f"503 lines (BentoML load shedding) in the services' logs over the whole run, warm-ups included: {shed}.",
        *(f"Service incident: {i}" for i in incidents),
    ]
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_line(),
        "load average (1, 5, 15 min) at start": ", ".join(f"{x:.2f}" for x in load_start),
        "load average (1 min) when the cells began": f"{load_cells:.2f}; other jobs' CPU then: {first_other:.2f} cores ("
            + ("did not wait" if args.no_wait else f"waited {first_wait:.0f} s for <= {args.max_other_cores:g}, at "
               f"most {args.first_wait_s:g} s; then up to {args.quiet_budget_s:g} s over the run waiting before cells "
               f"and re-running cells that other jobs shared") + ")",
        "load average (1, 5, 15 min) at end": ", ".join(f"{x:.2f}" for x in load_end),
        "versions": versions(),
        "served": f"Bento `{bento_tag}`, model `{model_tag}` (`bentoml serve <bento> --host 127.0.0.1`, as "
                  "`cacara serve --package work/package` runs it), workers 1, resources cpu 2",
        "serve limits (packaged)": ", ".join(f"{k} {v}" for k, v in serve_limits.items()),
        "service code (at start)": "; ".join(f"{k}: {v}" for k, v in code.items()),
        "bare model threads": f"onnxruntime intra-op {inference_threads()} (model/inference.py inference_threads)",
        "cells": f"users {args.users} x endpoints {args.endpoints} x batching on/off; per cell {args.warmup_s:g} s "
                 f"warm-up (not recorded), then a {args.cell_s:g}-s window or {args.max_requests} requests; "
                 f"spawn rate = users{'; --quick (smoke run)' if args.quick else ''}",
        "run time": f"{time.monotonic() - started:.0f} s",
    }
    text = render(meta, cells, memory, bare_rows, targets, notes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
