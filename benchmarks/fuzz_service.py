"""Fuzz the served Bento from its own OpenAPI schema with schemathesis, on loopback: no 5xx, still ready after.

schemathesis reads ``/docs.json`` (the schema BentoML serves), generates requests for every operation in
its three phases (the schema's examples, boundary values of each field's type and bounds, then random
fuzzing: wrong types, missing fields, odd media types, huge and empty values) and checks each answer with
``not_a_server_error``. Every request and its status is written to a HAR file, from which this script
counts the requests and their statuses; after the run it asks ``/readyz`` and sends one valid search.

    .venv/bin/python benchmarks/fuzz_service.py                 # the last `make run`'s package, 8 minutes
    .venv/bin/python benchmarks/fuzz_service.py --max-examples 100 --max-time 1800

The test suite runs a short fuzz (tests/test_serving.py) through :func:`fuzz`; this script runs the long
one against ``work/package`` and writes benchmarks/results/fuzz_service.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import machine_line  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "fuzz_service.md"


@dataclass
class FuzzResult:
    """What one schemathesis run sent and got back."""

    requests: int
    statuses: dict[int, int]
    by_operation: dict[str, int]
    server_errors: list[str] = field(default_factory=list)
    exit_code: int = 0
    seconds: float = 0.0
    ready_after: bool = False
    search_after: bool = False
    output_tail: str = ""

    @property
    def five_xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)


def _get(url: str, timeout: float = 10) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except OSError:
        return 0


def _search_works(base: str) -> bool:
    request = urllib.request.Request(base + "/search", data=json.dumps({"query": "a dog barks", "k": 3}).encode(),
                                     headers={"content-type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status == 200 and len(json.loads(r.read())) == 3
    except (OSError, ValueError):
        return False


def fuzz(base: str, workdir: Path, max_examples: int, seed: int = 0, max_time_s: float | None = None,
         timeout_s: float = 900) -> FuzzResult:
    """Run schemathesis against the service at ``base`` and count what it sent from its HAR report.

    schemathesis' exit code is 1 when any check failed; the result carries it, with the requests that
    got a 5xx (method, path and status), so a caller can say which request broke the service.
    """
    har = workdir / "fuzz.har"
    cmd = [str(Path(sys.executable).with_name("st")), "run", f"{base}/docs.json", "--url", base,
           "--checks", "not_a_server_error", "--max-examples", str(max_examples), "--seed", str(seed),
           "--request-timeout", "60", "--report", "har", "--report-har-path", str(har), "--no-color",
           "--generation-database", "none", "--warnings", "off"]
    if max_time_s is not None:
        cmd += ["--max-time", str(max_time_s)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=workdir,
                          env=dict(os.environ, SCHEMATHESIS_TELEMETRY="false"))
    seconds = time.monotonic() - start
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses: collections.Counter[int] = collections.Counter()
    by_operation: collections.Counter[str] = collections.Counter()
    errors = []
    for entry in entries:
        status = int(entry["response"]["status"])
        method, url = entry["request"]["method"], entry["request"]["url"]
        path = "/" + url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        statuses[status] += 1
        by_operation[f"{method} {path if not path.startswith('/clips/') else '/clips/{clip_id}/audio'}"] += 1
        if status >= 500:
            errors.append(f"{method} {path} -> {status}")
    return FuzzResult(len(entries), dict(sorted(statuses.items())), dict(sorted(by_operation.items())), errors,
                      proc.returncode, seconds, _get(base + "/readyz") == 200, _search_works(base),
                      (proc.stdout + proc.stderr)[-4000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(package: Path, home: Path, log: Path, drift_log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = dict(os.environ, BENTOML_HOME=str(home), CACARA_DRIFT_LOG_DIR=str(drift_log), BENTOML_DO_NOT_TRACK="true")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "cacara.cli", "serve", "--package", str(package), "--port",
                                 str(port)], stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while _get(base + "/readyz", 2) != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the service did not come up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, base


def render(result: FuzzResult, args: argparse.Namespace, package: dict) -> str:
    statuses = ", ".join(f"{s}: {n}" for s, n in result.statuses.items())
    operations = "\n".join(f"| `{op}` | {n} |" for op, n in result.by_operation.items())
    verdict = "met" if result.requests >= 1000 and result.five_xx == 0 and result.ready_after else "NOT met"
    return f"""# Fuzzing the served model (schemathesis)

Written by `benchmarks/fuzz_service.py` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}.
Machine: {machine_line()}.
Service: `cacara serve --package work/package` (model `{package.get('model_tag', '?')}`), one worker, loopback,
request log for drift checks on. schemathesis {_version('schemathesis')}, `--max-examples {args.max_examples}`
per operation, `--max-time {args.max_time:g}` s, seed {args.seed}, all phases (examples, coverage, fuzzing),
check `not_a_server_error`.

**Target (at least 1000 requests, no 5xx, `/readyz` still answers): {verdict}.**

| | |
|---|---|
| requests sent | {result.requests} |
| 5xx answers | {result.five_xx} |
| statuses | {statuses} |
| schemathesis exit code | {result.exit_code} |
| `/readyz` after the run | {'200' if result.ready_after else 'no answer'} |
| a valid search after the run | {'answered' if result.search_after else 'failed'} |
| wall time | {result.seconds:.0f} s |

Requests per operation:

| operation | requests |
|---|---|
{operations}

{('5xx answers:' + chr(10) + chr(10).join('- ' + e for e in result.server_errors[:50])) if result.server_errors else ''}
"""


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--package", default=str(ROOT / "work" / "package"), help="a `cacara package` folder")
    parser.add_argument("--bentoml-home", default=str(ROOT / "work" / "bentoml"))
    parser.add_argument("--max-examples", type=int, default=25, help="schemathesis examples per operation and phase")
    parser.add_argument("--max-time", type=float, default=480, help="seconds for the whole schemathesis run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    package = Path(args.package)
    if not (package / "package.json").exists():
        raise SystemExit(f"no package in {package}: run `make run` first")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        proc, base = _serve(package, Path(args.bentoml_home), work / "serve.log", work / "drift_log")
        try:
            result = fuzz(base, work, args.max_examples, args.seed, max_time_s=args.max_time,
                          timeout_s=args.max_time + 600)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    Path(args.out).write_text(render(result, args, json.loads((package / "package.json").read_text())))
    print(Path(args.out).read_text())
    return 0 if result.five_xx == 0 and result.ready_after else 1


if __name__ == "__main__":
    sys.exit(main())
