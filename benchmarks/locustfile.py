"""Locust users for benchmarks/serving_load.py: one endpoint per run, closed loop (no wait between requests).

Run by serving_load.py as ``locust -f benchmarks/locustfile.py --headless -u N -r N -t T --host URL``; the
run is described by environment variables (all set by serving_load.py):

    CACARA_LOAD_ENDPOINT   embed_text | embed_audio | search
    CACARA_LOAD_PAYLOAD    a JSON file: {"texts": [...], "queries": [...], "audio": ["clip.wav", ...]}
    CACARA_LOAD_WARMUP_S   seconds of load whose requests are not recorded
    CACARA_LOAD_CELL_S     seconds recorded after the warm-up; then the run quits
    CACARA_LOAD_MAX        at most this many recorded requests (the window ends early when reached)
    CACARA_LOAD_OUT        where the recorded requests go (JSON)

Locust's own statistics round response times (two significant digits above 100 ms), so every request
completed inside the window is recorded here with its exact time and status; serving_load.py computes
throughput and percentiles from them. ``-t`` is only a safety bound on the run.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, events, task

ENDPOINT = os.environ.get("CACARA_LOAD_ENDPOINT", "search")
PAYLOAD = json.loads(Path(os.environ["CACARA_LOAD_PAYLOAD"]).read_text(encoding="utf-8")) \
    if os.environ.get("CACARA_LOAD_PAYLOAD") else {"texts": ["a dog"], "queries": ["a dog"], "audio": []}
WARMUP_S = float(os.environ.get("CACARA_LOAD_WARMUP_S", "3"))
CELL_S = float(os.environ.get("CACARA_LOAD_CELL_S", "20"))
MAX_REQUESTS = int(os.environ.get("CACARA_LOAD_MAX", "100000"))
OUT = os.environ.get("CACARA_LOAD_OUT", "")

BOUNDARY = "cacaraloadboundary7d1f0c"


def multipart(path: str) -> bytes:
    """One ``audio`` file field, built once per clip so the client spends no time encoding."""
    head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"{Path(path).name}\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode()
    return head + Path(path).read_bytes() + f"\r\n--{BOUNDARY}--\r\n".encode()


AUDIO_BODIES = [multipart(p) for p in PAYLOAD.get("audio", [])] if ENDPOINT == "embed_audio" else []

window = {"start": None, "end": None}
records: list[tuple[float, float, int, str]] = []  # (completed at, ms, status, error)
_user_ids = itertools.count()


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, **_kw):
    now = time.time()
    if window["start"] is None or window["end"] is not None or now < window["start"]:
        return
    status = int(getattr(response, "status_code", 0) or 0)
    error = "" if exception is None else f"{type(exception).__name__}: {str(exception)[:160]}"
    records.append((now, float(response_time), status, error))
    if len(records) >= MAX_REQUESTS:
        window["end"] = now


@events.test_start.add_listener
def _start(environment, **_kw):
    def clock():
        gevent.sleep(WARMUP_S)
        window["start"] = time.time()
        deadline = window["start"] + CELL_S
        while window["end"] is None and time.time() < deadline:
            gevent.sleep(0.05)
        if window["end"] is None:
            window["end"] = time.time()
        environment.runner.quit()

    gevent.spawn(clock)


@events.quitting.add_listener
def _write(environment, **_kw):
    if not OUT:
        return
    Path(OUT).write_text(json.dumps({"endpoint": ENDPOINT, "window_start": window["start"],
                                     "window_end": window["end"], "users": environment.runner.user_count
                                     if environment.runner else None, "records": records}), encoding="utf-8")


class ServiceUser(FastHttpUser):
    wait_time = constant(0)
    network_timeout = 120.0
    connection_timeout = 30.0

    def on_start(self) -> None:
        n = next(_user_ids)  # each user starts at a different item, then goes round
        self.texts = itertools.islice(itertools.cycle(PAYLOAD["texts"]), n, None)
        self.queries = itertools.islice(itertools.cycle(PAYLOAD["queries"]), n, None)
        self.bodies = itertools.islice(itertools.cycle(AUDIO_BODIES or [b""]), n, None)

    @task
    def one_request(self) -> None:
        if ENDPOINT == "embed_text":
            self.client.post("/embed_text", json={"texts": [next(self.texts)]}, name="embed_text")
        elif ENDPOINT == "embed_audio":
            self.client.post("/embed_audio", data=next(self.bodies), name="embed_audio",
                             headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
        elif ENDPOINT == "search":
            self.client.post("/search", json={"query": next(self.queries), "k": 5}, name="search")
        else:
            raise ValueError(f"unknown endpoint {ENDPOINT!r}")
