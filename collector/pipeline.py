"""The wiring: receive → journal → assemble → fault processor → export queue.

The fault processor (faults.py) attributes, enriches and stores each whole trace.

:class:`Collector` owns every stage and thread. Run it from code (tests, benchmarks)::

    collector = Collector(load_config(flags={"grpc_port": 0, "http_port": 0, "api_port": 0}))
    collector.start()                 # binds the ports; see collector.grpc_port etc.
    ...
    collector.stop()

Threads: gRPC handlers and the HTTP event loop only decode, journal and buffer
requests; one decision thread completes traces, attributes, enriches, queues them for
export and writes the store; one exporter thread drains the queue to the backend; the
journal's thread fsyncs it every ``journal_fsync_ms`` (with 0, each handler fsyncs its
own request, see diskqueue.py); with ``memory_limit_mib`` set, one thread samples
resident memory (see admission.py).
Spans are acknowledged to the sender once journaled, and released from the journal
only once they sit in the export queue (or, without an endpoint, in the store).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from .admission import MemoryGuard, rss_bytes, rss_supported
from .api import api_routes
from .assemble import Callees, DecisionCache, Trace, TraceBuffer
from .attribute import Attributor
from .catalog import Catalog, load_catalog
from .config import CollectorConfig, ConfigError
from .decode import Received, SpanRecord, expected_type, flatten
from .diskqueue import DiskBudget, ExportQueue, Journal, QueueFull
from .enrich import forwarded
from .export import Exporter, queue_item
from .faults import FaultProcessor
from .metrics import SIGNAL_ATTRIBUTES, CollectorMetrics
from .notify import Notifier
from .receive import GRPC_SERVER_OPTIONS, HTTP_RUNNER_OPTIONS, add_grpc_receiver, http_routes
from .security import BearerAuth, grpc_credentials, server_ssl_context
from .spans import operation_of
from .store import FaultStore

_log = logging.getLogger(__name__)
_TICK_SECONDS = 0.05


class Collector:
    """One collector process: receivers, decision loop, exporter, store and API."""

    def __init__(self, config: CollectorConfig, catalog: Catalog | None = None) -> None:
        self.config = config
        self.catalog = catalog or load_catalog(
            Path(config.catalog) if config.catalog else None, config.runbook_base_url
        )
        self.metrics = CollectorMetrics(config.max_metric_services)
        self.attributor = Attributor(self.catalog, config.min_baseline_samples, config.fp_budget)
        self._wanted = self.attributor.wanted_attributes | SIGNAL_ATTRIBUTES
        self.decisions = DecisionCache(config.decision_cache_size)
        self.buffer = TraceBuffer(
            config.decision_wait,
            config.early_grace,
            config.max_spans,
            config.max_traces,
            self.decisions,
            Callees(operation_of),
        )
        queue_dir = Path(config.queue_dir)
        self.budget = DiskBudget(config.queue_max_bytes)
        self.journal = Journal(
            queue_dir / "inbox", self.budget, fsync_interval=config.journal_fsync_ms / 1000
        )
        self.queue = (
            ExportQueue(queue_dir / "export", self.budget) if config.export_endpoint else None
        )
        self.store = FaultStore(Path(config.store)) if config.store else None
        self.notifier = Notifier.from_config(config, self.metrics)
        self.faults = FaultProcessor(
            self.attributor, self.decisions, self.metrics, self.store, self.notifier
        )
        self._lock = threading.Lock()
        self._decide_lock = threading.Lock()
        self._evicted: list[Trace] = []
        self._late: list[SpanRecord] = []
        # Requests whose spans are all decided, oldest first, until they sit in the
        # export queue (see _hand_on).
        self._backlog: list[Received] = []
        self._warned: set[tuple[str, str]] = set()  # ignored-attribute causes logged
        self._stop = threading.Event()
        self._decider = threading.Thread(
            target=self._decide_loop, name="otel-dl-decider", daemon=True
        )
        self._exporter: Exporter | None = None
        self._grpc: grpc.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []
        self.grpc_port = self.http_port = self.api_port = 0
        self._auth = BearerAuth(config.auth_token)
        # Built here so a bad certificate stops the collector before anything starts.
        self._ssl = server_ssl_context(config)
        self._grpc_credentials = grpc_credentials(config)
        self.memory = self._memory_guard(config.memory_limit_mib)

    def _memory_guard(self, limit_mib: int) -> MemoryGuard | None:
        if not limit_mib:
            return None
        if not rss_supported():
            raise ConfigError(
                "memory_limit_mib needs /proc/self/statm to read resident memory (Linux); "
                "leave it 0 on this system"
            )
        guard = MemoryGuard(limit_mib << 20, self.metrics.observe_memory)
        rss = rss_bytes()
        if rss >= guard.soft_limit:
            raise ConfigError(
                f"memory_limit_mib {limit_mib}: the collector already uses {rss >> 20} MiB "
                f"before taking any data, over 80 % of the limit; give at least "
                f"{int(rss / (1 << 20) / 0.8) + 64}"
            )
        return guard

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Replay the journal, then start the decision loop, exporter and servers."""
        replayed = 0
        for payload in self.journal.replay():
            request = ExportTraceServiceRequest.FromString(payload)
            self.ingest(request, payload, force=True)
            replayed += 1
        self.journal.drop_replayed()
        if replayed:
            _log.info("replayed %d journaled requests from the previous run", replayed)
        self._decider.start()
        if self.memory is not None:
            self.memory.start()
        if self.queue is not None and self.config.export_endpoint:
            self._exporter = Exporter(
                self.config.export_endpoint,
                self.queue,
                self.metrics,
                self.config.export_headers,
                self.config.export_timeout,
                self.config.export_max_backoff,
            )
            self._exporter.start()
        self._start_grpc()
        self._start_http()

    def _start_grpc(self) -> None:
        server = grpc.server(
            # For methods other than Export (none is served): Export has its own pool.
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="otel-dl-grpc"),
            interceptors=self._auth.grpc_interceptors(),
            options=[
                # grpc answers a larger message (after decompression) with RESOURCE_EXHAUSTED.
                ("grpc.max_receive_message_length", self.config.max_request_bytes),
                *GRPC_SERVER_OPTIONS,
            ],
        )
        add_grpc_receiver(server, self.ingest, self.admit)
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            if self._grpc_credentials is not None:
                self.grpc_port = server.add_secure_port(address, self._grpc_credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError:  # recent grpcio raises where older ones returned 0
            self.grpc_port = 0
        if self.grpc_port == 0:
            raise OSError(
                f"cannot listen for OTLP/gRPC on {self.config.host}:{self.config.grpc_port} "
                "(the port is taken, or the host is not an address of this machine); pick a "
                "free port with --grpc-port, or another --host"
            )
        server.start()
        self._grpc = server

    def _start_http(self) -> None:
        loop = asyncio.new_event_loop()
        started = threading.Event()
        failure: list[BaseException] = []

        async def setup() -> None:
            otlp = web.Application(client_max_size=self.config.max_request_bytes)
            http_routes(otlp, self.ingest, self.config.max_request_bytes, self._auth, self.admit)
            api = web.Application()
            api_routes(
                api,
                Path(self.config.store) if self.config.store else None,
                self.metrics,
                self._auth,
            )
            ports = []
            for app, port, options in (
                (otlp, self.config.http_port, HTTP_RUNNER_OPTIONS),
                (api, self.config.api_port, {}),
            ):
                runner = web.AppRunner(app, access_log=None, **options)
                await runner.setup()
                site = web.TCPSite(runner, self.config.host, port, ssl_context=self._ssl)
                await site.start()
                self._runners.append(runner)
                ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            self.http_port, self.api_port = ports

        def run() -> None:
            asyncio.set_event_loop(loop)
            # The API's store queries; the OTLP/HTTP receiver has a pool of its own.
            loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="otel-dl-http"))
            try:
                loop.run_until_complete(setup())
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._loop = loop
        self._loop_thread = threading.Thread(target=run, name="otel-dl-http", daemon=True)
        self._loop_thread.start()
        started.wait()
        if failure:
            raise OSError(
                f"cannot listen for OTLP/HTTP or the API on {self.config.host} "
                f"(ports {self.config.http_port}, {self.config.api_port}): {failure[0]}; "
                "pick free ports with --http-port and --api-port"
            )

    def stop(self) -> None:
        """Stop receiving, decide what is buffered, hand it on, and stop every thread."""
        if self._grpc is not None:
            self._grpc.stop(grace=1).wait()
        if self._loop is not None and self._loop_thread is not None:
            loop = self._loop

            async def cleanup() -> None:
                for runner in self._runners:
                    await runner.cleanup()

            if self._loop_thread.is_alive():
                asyncio.run_coroutine_threadsafe(cleanup(), loop).result(timeout=10)
                loop.call_soon_threadsafe(loop.stop)
                self._loop_thread.join(timeout=10)
            loop.close()
        if self.memory is not None:
            self.memory.stop()
        self._stop.set()
        if self._decider.is_alive():
            self._decider.join(timeout=10)
        if self.notifier is not None:
            self.notifier.close()
        if self._exporter is not None:
            self._exporter.stop()
        if self.queue is not None:
            self.queue.close()
        self.journal.close()
        if self.store is not None:
            self.store.close()

    # --- receive side ---------------------------------------------------------------------
    def admit(self, waited: float = 0.0, queued: int = 0) -> None:
        """Raise :class:`QueueFull` (back-pressure) when no request should be taken now.

        ``waited``: seconds the request waited, or would wait, for a worker thread;
        ``queued``: requests waiting for a busy worker ahead of it, as it arrives. See
        admission.py.
        """
        if self.budget.full:
            self.metrics.requests_throttled.labels("disk").inc()
            raise QueueFull(
                f"disk queue holds {self.budget.used} of {self.budget.max_bytes} bytes "
                "(queue_max_bytes)"
            )
        if self.memory is not None and self.memory.over:
            self.metrics.requests_throttled.labels("memory").inc()
            raise QueueFull(
                f"collector memory in use {self.memory.in_use >> 20} MiB (resident "
                f"{self.memory.rss >> 20} MiB) is over its limit: refused above "
                f"{self.memory.soft_limit >> 20} MiB (80 % of memory_limit_mib), or above "
                f"{self.memory.pace_limit >> 20} MiB (75 %) once requests held back did not "
                "bring it down"
            )
        if queued and self.memory is not None and self.memory.pressing:
            self.metrics.requests_throttled.labels("memory").inc()
            raise QueueFull(
                f"collector memory in use {self.memory.in_use >> 20} MiB is above "
                f"{self.memory.pace_limit >> 20} MiB (75 % of memory_limit_mib) and "
                f"{queued} request(s) already wait for it to fall"
            )
        limit = self.config.max_request_wait
        if limit and waited > limit:
            self.metrics.requests_throttled.labels("overload").inc()
            raise QueueFull(
                f"overloaded: the request would wait, or waited, {waited:.1f} s for a "
                f"worker (max_request_wait {limit:g} s)"
            )

    def ingest(
        self, request: ExportTraceServiceRequest, raw: bytes | None, force: bool = False
    ) -> tuple[int, str]:
        """Journal and buffer one request; return ``(rejected spans, message)``.

        Raises :class:`QueueFull` (see :meth:`admit`) unless ``force``, which replays use.
        """
        if not force:
            self.admit()
        ignored: Counter[tuple[str, str]] = Counter()
        records, rejected, message = flatten(request, self._wanted, ignored, raw)
        if rejected:
            self.metrics.spans_rejected.inc(rejected)
        if ignored:
            self._count_ignored(ignored)
        if not records:
            return rejected, message
        received = records[0].received
        try:
            received.segment = self.journal.append(received.payload, len(records), force)
        except QueueFull:
            self.metrics.requests_throttled.labels("disk").inc()
            raise
        with self._lock:
            late, evicted = self.buffer.add(records, time.monotonic())
            self._late.extend(late)
            self._evicted.extend(evicted)
            self.metrics.spans_buffered.set(self.buffer.span_count)
        self.metrics.spans_received.inc(len(records))
        return rejected, message

    def _count_ignored(self, ignored: Counter[tuple[str, str]]) -> None:
        """Count attributes ignored for their value type; log each cause once per process.

        The sender gets the warning in every response, but senders seldom read it; the
        operator gets one line per (attribute, value type), not one per request.
        """
        for (key, received), n in ignored.items():
            self.metrics.attributes_ignored.labels(key, received).inc(n)
            with self._lock:
                first = (key, received) not in self._warned
                self._warned.add((key, received))
            if first:
                _log.warning(
                    "span attribute %s arrived as %s, not %s: ignored for fault attribution, "
                    "spans forwarded unchanged (counted in "
                    "otel_dl_collector_attributes_ignored_total; logged once per attribute "
                    "and type). Fix the sender to write %s as %s (see "
                    "docs/semantic-conventions.md)",
                    key,
                    received,
                    expected_type(key),
                    key,
                    expected_type(key),
                )

    # --- decision loop --------------------------------------------------------------------
    def _decide_loop(self) -> None:
        while not self._stop.wait(_TICK_SECONDS):
            self._decide_guarded()
        with self._lock:
            self._evicted.extend(self.buffer.pop_all())
        self._decide_guarded()

    def _decide_guarded(self) -> None:
        # The one decision thread must outlive any bug a strange trace may hit: a dead
        # decider would stop every forward. Spans of a failed round stay in the journal
        # and are replayed at the next start.
        try:
            self.decide_now()
        except Exception:
            self.metrics.decision_errors.inc()
            _log.exception("decision round failed; the decision thread goes on")

    def decide_now(self) -> int:
        """Decide every complete trace; return how many were decided."""
        with self._decide_lock:
            return self._decide()

    def _decide(self) -> int:
        now = time.monotonic()
        with self._lock:
            done = self.buffer.pop_complete(now)
            evicted, self._evicted = self._evicted, []
            late, self._late = self._late, []
            self.metrics.spans_buffered.set(self.buffer.span_count)
        self.metrics.traces_evicted.inc(len(evicted))
        traces = evicted + done
        for rec in self.faults.process(traces, late):
            received = rec.received
            received.undecided -= 1
            if not received.undecided:
                self._backlog.append(received)
        self._hand_on()
        self.metrics.queue_bytes.set(self.budget.used)
        return len(traces)

    def _hand_on(self) -> None:
        """Move every request whose spans are all decided into the export queue, then
        release it from the journal.

        A request is forwarded as received, its spans enriched in place: requests are
        joined into queue items of about ``export_batch_spans`` spans by concatenating
        their encodings (two encoded ``ExportTraceServiceRequest`` messages, concatenated,
        are one request holding both), so no span is copied or regrouped. The export
        queue takes them even when the disk budget is spent: they already count against
        it in the journal, which is given back only once they moved. Refusing them there
        would hold the journal, and the budget, for good.
        """
        backlog = self._backlog
        while backlog:
            if self.queue is None:
                taken = len(backlog)
            else:
                taken, spans, parts = 0, 0, []
                step = self.config.export_batch_spans
                while taken < len(backlog) and (not spans or spans + backlog[taken].spans <= step):
                    parts.append(forwarded(backlog[taken]))
                    spans += backlog[taken].spans
                    taken += 1
                self.queue.append(queue_item(spans, parts), force=True)
                self.metrics.spans_queued.inc(spans)
            segments: dict[int, int] = {}
            for received in backlog[:taken]:
                segments[received.segment] = segments.get(received.segment, 0) + received.spans
            # Taken off the backlog before the journal lets go, so a failure in between
            # can only leave the journal holding spans (replayed), never queue them twice.
            del backlog[:taken]
            self.journal.release(segments)
