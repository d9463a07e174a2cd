"""Spans made in DataLoader workers and pre-fork server workers reach a real OTLP backend.

Each application below runs as its own process, set up by ``otel_dl.instrument()`` alone
(the real OTLP/gRPC exporter behind the SDK's batch processor), and exports to the real
loopback sink of ``tests/otlp_sink.py``. Every span carries a ``case`` attribute, so the
sink counts what each case received against what the application made:

- DataLoader workers (``fork``, ``forkserver``, ``spawn``; per-epoch and persistent
  workers): the dataset's ``__getitem__`` runs an ``otel_dl.stage`` in the worker, one
  span per sample, next to the main process's ``dataloader.batch`` spans. The persistent
  loaders are still running when the application exits.
- A pre-fork server on ``multiprocessing`` (the same three start methods): workers share
  one listening socket, each serves a fixed number of requests and exits, and the parent
  starts a new one in its place (worker recycling); one ``otel_dl.stage`` span per request.
- Real gunicorn (sync workers, ``--max-requests``), with and without ``--preload``.

Workers started with ``spawn`` or ``forkserver`` are new interpreters: they call
``otel_dl.instrument()`` themselves (in ``worker_init_fn``, or as the server's worker
code does), as the README says. The applications never call ``shutdown()``: what is
exported is what otel-dl flushes on its own when processes exit.

The module is also the applications' code: ``python -m tests.reliability.test_sdk_processes
dataloader|prefork|stopping ...`` runs one, and gunicorn loads ``gunicorn_app()`` from it.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import numpy as np

import otel_dl
from tests.otlp_sink import OtlpSink
from tests.reliability.findings import record, scale

ROOT = Path(__file__).resolve().parents[2]
PYCACHE = str(Path(tempfile.gettempdir()) / "otel-dl-reliability-pycache")
MODULE = "tests.reliability.test_sdk_processes"
BATCH = 8
WORKERS = 2
# Each spawn worker imports torch anew (seconds here), so make test runs one per loader.
LOADER_WORKERS = int(scale(1, 2))
START_METHODS = ("fork", "forkserver", "spawn")
CASE_ENV = "OTEL_DL_RELIABILITY_CASE"


# --- The applications ------------------------------------------------------------------


@otel_dl.stage("decode")
def _decode(index: int) -> np.ndarray:
    return np.full(4, float(index), dtype=np.float32)


@otel_dl.stage("handle")
def _handle(payload: bytes) -> np.ndarray:
    return np.frombuffer(payload.ljust(8, b" ")[:8], dtype=np.uint8).astype(np.float32)


class Samples:
    """A map-style dataset whose items come from a traced user function, in the worker."""

    def __init__(self, case: str, size: int) -> None:
        self.case = case
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Any:
        import torch

        with otel_dl.attributes(case=self.case):
            return torch.from_numpy(_decode(index))


def _init_worker(_worker_id: int) -> None:
    """``worker_init_fn`` for spawn and forkserver workers, which start with no providers."""
    otel_dl.instrument("dataloader-worker")


def _dataloader_app(method: str, size: int, epochs: int, workers: int) -> None:
    from torch.utils.data import DataLoader

    if method == "forkserver":
        multiprocessing.set_forkserver_preload(["torch", "otel_dl", MODULE])
    otel_dl.instrument("dataloader-app")
    loaders: dict[str, Any] = {}
    for persistent in (False, True):
        case = f"{method}/{'persistent' if persistent else 'per-epoch'}"
        dataset: Any = Samples(case, size)
        loaders[case] = DataLoader(
            dataset,
            batch_size=BATCH,
            num_workers=workers,
            multiprocessing_context=method,
            persistent_workers=persistent,
            worker_init_fn=None if method == "fork" else _init_worker,
        )
    # Both loaders' workers start at once: with spawn, their start-up is mostly imports.
    first_epoch = {case: iter(loader) for case, loader in loaders.items()}
    for case, loader in loaders.items():
        with otel_dl.attributes(case=case):
            for _batch in first_epoch.pop(case):
                pass
            for _epoch in range(epochs - 1):
                for _batch in loader:
                    pass
    # The persistent loader's workers are still running when the application exits.
    print(json.dumps({"loaders": len(loaders)}), flush=True)


_STOPPING = threading.Event()


def _serve(listener: socket.socket, per_worker: int, case: str) -> None:
    """A pre-fork worker: serve ``per_worker`` requests, then exit to be replaced.

    SIGTERM stops it gracefully, as gunicorn's workers do: it finishes the request in
    hand and returns.
    """
    signal.signal(signal.SIGTERM, lambda *_: _STOPPING.set())
    otel_dl.instrument("prefork-worker", include=["ingest"], propagation=False)
    listener.settimeout(0.05)  # every worker polls, so each sees its stop flag
    served = 0
    while served < per_worker and not _STOPPING.is_set():
        try:
            conn, _address = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(30)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                request += chunk
            with otel_dl.attributes(case=case):
                _handle(request[:8])
            body = str(os.getpid()).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
        served += 1


def _prefork_app(method: str, workers: int, per_worker: int) -> None:
    context: Any = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["otel_dl", MODULE])
    otel_dl.instrument("prefork-server", include=["ingest"], propagation=False)
    listener = socket.create_server(("127.0.0.1", 0), backlog=128)
    # One flag for the server and its workers: a worker forked a moment before SIGTERM
    # still runs this handler, and its _serve() then returns at once.
    signal.signal(signal.SIGTERM, lambda *_: _STOPPING.set())
    case = f"prefork/{method}"
    slots: dict[int, Any] = {}
    started = 0
    print(listener.getsockname()[1], flush=True)
    while not _STOPPING.is_set():
        for slot in range(workers):
            worker = slots.get(slot)
            if worker is None or not worker.is_alive():
                if worker is not None:
                    worker.join()
                slots[slot] = context.Process(target=_serve, args=(listener, per_worker, case))
                slots[slot].start()
                started += 1
        _STOPPING.wait(0.02)
    for worker in slots.values():
        worker.terminate()  # SIGTERM: the worker stops after the request in hand
    for worker in slots.values():
        worker.join(30)
    print(json.dumps({"workers_started": started}), flush=True)


def _stopped_worker(made: Any, spans: int) -> None:
    # SystemExit from a signal handler, as gunicorn's SIGINT and SIGQUIT handlers do.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))
    with otel_dl.attributes(case="stopped-while-flushing"):
        for _ in range(spans):
            _handle(b"x")
    made.set()


def _stopped_while_flushing_app(spans: int) -> None:
    """A forked worker is sent SIGTERM while its exit flush waits to retry an export."""
    context = multiprocessing.get_context("fork")
    otel_dl.instrument("stopping-app", include=["ingest"], propagation=False)
    made = context.Event()
    worker = context.Process(target=_stopped_worker, args=(made, spans))
    worker.start()
    made.wait(60)
    time.sleep(0.3)  # the worker is in its exit flush, backing off (about 1 s) to retry
    worker.terminate()
    worker.join(60)
    print(json.dumps({"exitcode": worker.exitcode}), flush=True)


def gunicorn_app() -> Callable[..., Iterable[bytes]]:
    """The WSGI application gunicorn loads (in the master with --preload, else per worker)."""
    otel_dl.instrument("gunicorn-app", include=["ingest"], propagation=False)
    case = os.environ[CASE_ENV]

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with otel_dl.attributes(case=case):
            _handle(environ.get("PATH_INFO", "/").encode())
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]

    return app


# --- The test side ---------------------------------------------------------------------


def _env(sink: OtlpSink, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k != "PYTHONDONTWRITEBYTECODE"
    }
    env.update(
        OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint,
        OTEL_METRICS_EXPORTER="none",  # the sink receives traces only
        PYTHONPATH=str(ROOT),
        # Compiled bytecode in a cache of the children's own: the second child to import
        # torch or otel-dl does not compile it again.
        PYTHONPYCACHEPREFIX=PYCACHE,
        **extra,
    )
    return env


def _received(sink: OtlpSink) -> Counter[tuple[str, str]]:
    """Spans the sink holds, by (case attribute, span name)."""
    counts: Counter[tuple[str, str]] = Counter()
    for resource_spans in list(sink.resource_spans):
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                case = next(
                    (kv.value.string_value for kv in span.attributes if kv.key == "case"), ""
                )
                counts[(case, span.name)] += 1
    return counts


def _wait_for(sink: OtlpSink, expected: Counter[tuple[str, str]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = _received(sink)
        if all(got[key] >= count for key, count in expected.items()):
            return
        time.sleep(0.1)


def _get(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/req", timeout=60) as response:
        return response.read().decode()


def _wait_for_port(port: int, process: subprocess.Popen[str], timeout: float = 120) -> None:
    """Until something accepts on ``port`` (no request is sent: each one makes a span)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"the server never listened on {port} (exit code {process.poll()})")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[str], timeout: float = 60) -> None:
    """SIGTERM the server and wait for it to exit; on a timeout, kill its process group
    (it was started in a session of its own), workers included."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _served(
    start: Callable[[], tuple[subprocess.Popen[str], int]], requests: int
) -> tuple[int, int, str | None]:
    """Start a server, send ``requests`` sequential requests, stop it with SIGTERM;
    (requests answered, distinct worker processes that answered, the first failure)."""
    pids: set[str] = set()
    answered = 0
    try:
        process, port = start()
    except (AssertionError, OSError, ValueError) as exc:
        return 0, 0, f"the server did not start: {exc}"
    failure = None
    try:
        for _ in range(requests):
            pids.add(_get(port))
            answered += 1
    except OSError as exc:
        failure = f"request {answered + 1} failed: {exc}"
    finally:
        _stop(process)
    return answered, len(pids), failure


def test_spans_from_dataloader_workers_reach_the_backend(tmp_path: Path) -> None:
    size = int(scale(24, 96))
    epochs = int(scale(1, 3))
    batches = math.ceil(size / BATCH) * epochs
    rows = [["case", "worker spans expected", "received", "batch spans expected", "received"]]
    problems: list[str] = []
    elapsed: dict[str, float] = {}
    with OtlpSink() as sink:
        # The three applications run side by side: most of their time is imports.
        start = time.monotonic()
        apps = {
            method: subprocess.Popen(
                [
                    *(sys.executable, "-m", MODULE, "dataloader", method),
                    *(str(size), str(epochs), str(LOADER_WORKERS)),
                ],
                env=_env(sink),
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=(tmp_path / f"{method}.log").open("w"),
                start_new_session=True,
            )
            for method in START_METHODS
        }
        for method, app in apps.items():
            try:
                code = app.wait(600)
            except subprocess.TimeoutExpired:
                os.killpg(app.pid, signal.SIGKILL)  # its workers too
                code = app.wait()
            elapsed[method] = time.monotonic() - start
            if code != 0:
                log = (tmp_path / f"{method}.log").read_text()[-2000:]
                problems.append(f"{method}: exit code {code}: {log}")
        expected: Counter[tuple[str, str]] = Counter()
        for method in START_METHODS:
            for kind in ("per-epoch", "persistent"):
                expected[(f"{method}/{kind}", "decode")] = size * epochs
                expected[(f"{method}/{kind}", "dataloader.batch")] = batches
        _wait_for(sink, expected, timeout=10)
        got = _received(sink)
    for method in START_METHODS:
        for kind in ("per-epoch", "persistent"):
            case = f"{method}/{kind}"
            rows.append(
                [
                    case,
                    str(expected[(case, "decode")]),
                    str(got[(case, "decode")]),
                    str(expected[(case, "dataloader.batch")]),
                    str(got[(case, "dataloader.batch")]),
                ]
            )
    lost = {key: expected[key] - got[key] for key in expected if got[key] != expected[key]}
    total = sum(expected.values())
    record(
        "sdk-processes",
        tried=[
            f"3 DataLoader applications (start methods {', '.join(START_METHODS)}), each with "
            f"a per-epoch and a persistent loader of {LOADER_WORKERS} worker(s) over {size} "
            f"samples for {epochs} epoch(s); the persistent loaders were still running at exit; "
            f"{total:,} spans expected in all; the applications ran side by side and exited "
            f"after {', '.join(f'{s:.0f} s ({m})' for m, s in elapsed.items())}.",
        ],
        held=[]
        if lost or problems
        else [
            f"{total:,} of {total:,} spans reached the OTLP sink: every span made in a worker "
            "and every dataloader.batch span of the main process, for all 6 loaders."
        ],
        did_not_hold=[
            f"{case}: {count} of {expected[(case, name)]} {name} spans lost."
            for (case, name), count in lost.items()
        ]
        + problems,
        table=rows,
        notes=[
            "Workers end through os._exit(); otel_dl.instrument() registers a multiprocessing "
            "finalizer that flushes the worker's spans first, and at exit shuts down the "
            "workers of persistent loaders still running, so they flush rather than being "
            "terminated."
        ],
    )
    assert not problems, problems
    assert not lost, f"spans lost (expected minus received): {lost}"


def _prefork(method: str, workers: int, per_worker: int, sink: OtlpSink, log: Path):
    def start() -> tuple[subprocess.Popen[str], int]:
        process = subprocess.Popen(
            [sys.executable, "-m", MODULE, "prefork", method, str(workers), str(per_worker)],
            env=_env(sink),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=log.open("w"),
            text=True,
            start_new_session=True,
        )
        assert process.stdout is not None
        port = int(process.stdout.readline())
        return process, port

    return start


def _gunicorn(preload: bool, per_worker: int, sink: OtlpSink, log: Path):
    def start() -> tuple[subprocess.Popen[str], int]:
        import gunicorn

        port = _free_port()
        args = [
            sys.executable,
            "-m",
            "gunicorn",
            "--workers",
            str(WORKERS),
            "--max-requests",
            str(per_worker),
            "--bind",
            f"127.0.0.1:{port}",
        ]
        if preload:
            args.append("--preload")
        if gunicorn.version_info >= (27,):
            args.append("--no-control-socket")
        case = f"gunicorn/{'preload' if preload else 'no-preload'}"
        process = subprocess.Popen(
            [*args, f"{MODULE}:gunicorn_app()"],
            env=_env(sink, **{CASE_ENV: case}),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log.open("w"),
            text=True,
            start_new_session=True,
        )
        try:
            _wait_for_port(port, process)
        except AssertionError:
            _stop(process, timeout=5)
            raise
        return process, port

    return start


def test_spans_from_prefork_server_workers_reach_the_backend(tmp_path: Path) -> None:
    per_worker = int(scale(3, 10))
    requests = int(scale(12, 120))
    cases: list[tuple[str, Callable[[OtlpSink, Path], Any]]] = [
        *(
            (
                f"prefork/{method}",
                lambda sink, log, m=method: _prefork(m, WORKERS, per_worker, sink, log),
            )
            for method in START_METHODS
        ),
        *(
            (
                f"gunicorn/{'preload' if preload else 'no-preload'}",
                lambda sink, log, p=preload: _gunicorn(p, per_worker, sink, log),
            )
            for preload in (False, True)
        ),
    ]
    rows = [["case", "requests answered", "worker processes", "spans expected", "received"]]
    problems: list[str] = []
    with OtlpSink() as sink:
        for case, make in cases:
            answered, pids, failure = _served(
                make(sink, tmp_path / f"{case.replace('/', '-')}.log"), requests
            )
            _wait_for(sink, Counter({(case, "handle"): answered}), timeout=10)
            received = _received(sink)[(case, "handle")]
            rows.append([case, str(answered), str(pids), str(answered), str(received)])
            if failure is not None or answered != requests:
                problems.append(f"{case}: {answered} of {requests} requests answered; {failure}")
            if received != answered:
                problems.append(f"{case}: {answered - received} of {answered} request spans lost.")
    generations = requests // per_worker
    record(
        "sdk-processes",
        tried=[
            f"5 pre-fork servers ({', '.join(c for c, _ in cases)}) with {WORKERS} workers "
            f"that each exit after {per_worker} requests and are replaced; {requests} "
            f"sequential HTTP requests each, at least {generations} worker processes per "
            "server, then SIGTERM to the server."
        ],
        held=[]
        if problems
        else [
            f"{requests * len(cases):,} of {requests * len(cases):,} request spans reached the "
            "OTLP sink, from recycled workers and from the workers stopped with the server."
        ],
        did_not_hold=problems,
        table=rows,
        notes=[
            "A recycled multiprocessing worker ends through os._exit() (fork and forkserver); "
            "its spans are flushed by the finalizer otel_dl.instrument() registers. gunicorn "
            "workers leave through sys.exit(), so the atexit shutdown flushes them."
        ],
    )
    assert not problems, problems


def test_worker_stopped_during_its_exit_flush_still_delivers() -> None:
    spans = 5
    # The sink refuses the first export with UNAVAILABLE: the exporter backs off for about
    # a second, then retries.
    with OtlpSink(fail_with=grpc.StatusCode.UNAVAILABLE, fail_times=1) as sink:
        result = subprocess.run(
            [sys.executable, "-m", MODULE, "stopping", "fork", str(spans)],
            env=_env(sink),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        case = "stopped-while-flushing"
        _wait_for(sink, Counter({(case, "handle"): spans}), timeout=5)
        received = _received(sink)[(case, "handle")]
    exitcode = json.loads(result.stdout.splitlines()[-1])["exitcode"] if result.stdout else None
    held = received == spans and exitcode == 3
    record(
        "sdk-processes",
        tried=[
            f"A forked worker made {spans} spans and returned; its exit flush met an "
            "UNAVAILABLE answer and backed off to retry, and 0.3 s in, the worker was sent "
            "SIGTERM, whose handler raises SystemExit (as gunicorn's SIGINT/SIGQUIT ones do)."
        ],
        held=[
            f"{received} of {spans} spans arrived after the retry, and the worker then exited "
            f"by its handler (exit code {exitcode})."
        ]
        if held
        else [],
        did_not_hold=[]
        if held
        else [f"{received} of {spans} spans arrived; exit code {exitcode}."],
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert received == spans, "the SIGTERM cut the exit flush short"
    assert exitcode == 3, "the held SIGTERM never took effect"


def _main(argv: list[str]) -> None:
    kind, method, *numbers = argv
    counts = [int(n) for n in numbers]
    if kind == "dataloader":
        _dataloader_app(method, *counts)
    elif kind == "prefork":
        _prefork_app(method, *counts)
    elif kind == "stopping":
        _stopped_while_flushing_app(*counts)
    else:
        raise SystemExit(f"unknown application {kind!r}")


if __name__ == "__main__":
    _main(sys.argv[1:])
