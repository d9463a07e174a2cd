"""Overhead of otel-dl instrumentation, instrumented vs bare, measured in the same run.

    .venv/bin/python benchmarks/instrumentation.py [--repeats 7] [--cases dataloader,mlp,small]
    .venv/bin/python benchmarks/instrumentation.py --device cuda   # on a machine with a GPU
    .venv/bin/python benchmarks/instrumentation.py --cases cnn --cpu 1  # on one core

Every case alternates bare and instrumented blocks in one process and reports medians
over the repeats. Spans go through the SDK's BatchSpanProcessor to an exporter that
discards them, so export cost (a separate concern) is not counted. The floor is a bare
SDK span carrying 10 of an otel-dl inference span's attributes, measured in the same
run: "x floor" says how many bare spans the added cost is worth. A meter provider with a
reader is installed, as under the default exporter; otel-dl records no metric per call
by default (the collector derives ``dl.operation.duration`` from the spans), and
``--duration-metric`` measures it with the in-process record on (``duration_metric``),
each span's point then aggregated by that provider.
Last, the span otel-dl really makes (every attribute of the last case's last span, and
its duration record when on) is timed from the SDK alone: of a model row's added cost,
that much is the SDK's price of the attribute contract, and the rest is otel-dl's own
work.
torch and ONNX Runtime run on one thread so that the two cores of a small machine do
not add noise.
Each model learns its baseline before timing (the auto-baseline's one-off fit is not a
per-call cost). The ``gc`` case counts the full garbage collections of a 10 s serving
loop, bare, instrumented, and instrumented after ``gc.freeze()``, with their pauses. The
``idle`` case sleeps 5 ms before each call, as a served model waits between requests:
its caches are then cold, and per-call latency (median, and the p99 difference) shows
what a tight loop does not; its floor is the bare model called inside a bare SDK span
with the floor's 10 attributes, measured the same way.

A traced block includes the bursts its calls parked (``_burst.drain`` at its end). On a
machine whose cores run at different speeds (a shared VM), a case whose bare and traced
blocks land on different cores measures the cores, not otel-dl: the CNN row's bare
forward moved between about 9 and 16 ms from run to run on the 2-core machine here.
``--cpu N`` pins the process, with every thread otel-dl and the SDK start, to core N:
both run on the same core, and the background threads' work counts in the traced
figure instead of running beside it on the other core.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from timing import Discard, per_call
from torch.utils.data import DataLoader, TensorDataset

import otel_dl
from otel_dl import _burst, semconv
from otel_dl._config import get_config, set_config
from otel_dl.sampling import SignalAwareSpanProcessor


def _paired(
    bare: Callable[[], Any], traced: Callable[[], Any], calls: int, repeats: int
) -> tuple[float, float]:
    """Median seconds per call of ``bare`` and ``traced``, alternating blocks. A traced
    block includes the bursts its last calls parked (``_burst.drain``), which would
    otherwise run during the next block."""
    for fn in (bare, traced):
        per_call(fn, max(calls // 5, 1), _burst.drain)
    b, t = [], []
    for _ in range(repeats):
        b.append(per_call(bare, calls))
        t.append(per_call(traced, calls, _burst.drain))
    return statistics.median(b), statistics.median(t)


def _learn(instrumented: Any, call: Callable[[], Any]) -> None:
    """Call until ``instrumented`` has fitted its baseline: a one-off cost at the start of
    a model's life, not the per-call cost measured here."""
    monitor = otel_dl._watch.ensure_state(instrumented).monitor()
    for _ in range(10_000):
        if monitor.reference is not None:
            return
        call()


_FLOOR_ATTRIBUTES = {
    semconv.DL_STAGE: "inference",
    semconv.DL_COMPONENT: "torch.nn",
    semconv.DL_MODEL_NAME: "m",
    semconv.DL_MODEL_FRAMEWORK: "torch",
    semconv.DL_MODEL_FINGERPRINT: "0123456789abcdef",
    semconv.DL_BATCH_SIZE: 256,
    semconv.DL_PREDICTION_COUNT: 256,
    semconv.DL_CONFIDENCE_MEAN: 0.9,
    semconv.DL_DRIFT_SCORE: 0.01,
    semconv.DL_DRIFT_STATUS: "ok",
}


def _floor(repeats: int) -> float:
    tracer = trace.get_tracer("bench")
    attrs = _FLOOR_ATTRIBUTES

    def one() -> None:
        tracer.start_span("inference", attributes=attrs).end()

    return statistics.median(per_call(one, 2000) for _ in range(repeats))


def _contract_floor(repeats: int, attrs: dict[str, Any], record: bool) -> float:
    """A bare SDK span with every attribute of a real otel-dl inference span (``attrs``),
    ended, with its one ``dl.operation.duration`` record if ``record``: what the attribute
    contract costs in the SDK alone, before any of otel-dl's own work."""
    tracer = trace.get_tracer("bench")
    histogram = metrics.get_meter("bench").create_histogram("bench.duration", unit="s")
    labels = {k: attrs[k] for k in (semconv.DL_STAGE, semconv.DL_COMPONENT, semconv.DL_MODEL_NAME)}

    def one() -> None:
        span = tracer.start_span("inference", attributes=attrs)
        if record:
            histogram.record(1e-4, labels, context=trace.set_span_in_context(span))
        span.end()

    return statistics.median(per_call(one, 2000) for _ in range(repeats))


def _mlp() -> torch.nn.Module:
    """A 32-256-10 classifier as confident as a trained one: its output layer is scaled so
    that the top class gets about 0.8 on average. At its initial weights it gets about
    0.15, under ``confidence_threshold``, and signal-aware sampling would rightly keep
    every one of its spans as low-confidence, so ``sample_every`` would measure nothing."""
    out = torch.nn.Linear(256, 10)
    with torch.no_grad():
        out.weight.mul_(20.0)
        out.bias.mul_(20.0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), out)


class _Deep(torch.nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _cnn() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(512, 10),
    )


def _pair(
    make: Callable[[], torch.nn.Module], name: str
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(bare, watched) copies of one model, with the same weights."""
    bare_model = make()
    with suppress_instrumentation():
        bare_model.eval()  # eval() under suppression: this copy stays untraced
    traced_model = otel_dl.watch(make().eval(), name=name)
    traced_model.load_state_dict(bare_model.state_dict())
    return bare_model, traced_model


def _model_case(
    make: Callable[[], torch.nn.Module], x: torch.Tensor, calls: int, repeats: int
) -> tuple[float, float]:
    bare_model, traced_model = _pair(make, "bench")
    with torch.inference_mode():
        _learn(traced_model, lambda: traced_model(x))
        return _paired(lambda: bare_model(x), lambda: traced_model(x), calls, repeats)


def _dataloader_case(
    repeats: int, with_model: bool = False, sample_every: int = 1, presample: bool = True
) -> tuple[float, float]:
    """Per batch: a DataLoader epoch, optionally with an MLP forward on every batch.

    Bare runs have every otel-dl instrumentor off; instrumented runs, the defaults, or
    with ``sample_every`` > 1 signal-aware sampling as ``instrument(sample_every=N)`` sets
    it up: the option in force, and the spans going through a
    ``SignalAwareSpanProcessor`` in front of the batch processor, judging parked spans
    before they are made unless ``presample`` is False (the reference row for what that
    saves).
    """
    from otel_dl.instrumentors.dataloader import DataLoaderInstrumentor
    from otel_dl.instrumentors.torch_model import TorchModelInstrumentor

    loader = DataLoader(TensorDataset(torch.randn(100_000, 32)), batch_size=256)
    instrumentors = [DataLoaderInstrumentor(), TorchModelInstrumentor()]
    model = otel_dl.watch(_mlp().eval(), name="bench-mlp")
    provider: TracerProvider | None = None
    config = get_config()
    if sample_every > 1:
        provider = TracerProvider()
        export = BatchSpanProcessor(Discard(), max_queue_size=100_000)
        # As instrument(sample_every=N) installs it: unsampled spans are never made.
        provider.add_span_processor(
            SignalAwareSpanProcessor(export, sample_every, presample=presample)
        )
        set_config(dataclasses.replace(config, sample_every=sample_every))

    def epoch() -> None:
        with torch.inference_mode():
            for (x,) in loader:
                if with_model:
                    model(x)
        # The last batches' signals and spans, parked for a burst, are this epoch's work.
        _burst.drain()

    def instrument(tracer_provider: TracerProvider | None) -> None:
        for instrumentor in instrumentors:
            if instrumentor.is_instrumented_by_opentelemetry:
                instrumentor.uninstrument()
            instrumentor.instrument(tracer_provider=tracer_provider)
        otel_dl.watch(model, name="bench-mlp")

    bare, traced = [], []
    try:
        instrument(provider)
        epoch()  # learn the baselines before timing
        for _ in range(repeats):
            for instrumentor in instrumentors:
                instrumentor.uninstrument()
            bare.append(per_call(epoch, 1) / len(loader))
            instrument(provider)
            traced.append(per_call(epoch, 1) / len(loader))
    finally:
        if provider is not None:
            set_config(config)
            instrument(None)
            provider.shutdown()
    return statistics.median(bare), statistics.median(traced)


def _onnx_case(repeats: int, batch: int, zipmap: bool = False) -> tuple[float, float] | None:
    """An ONNX Runtime session of the MLP (exported from torch), or with ``zipmap`` a linear
    classifier whose probabilities come out as sklearn-onnx converts them by default: a
    ZipMap, one {class: probability} map per row."""
    try:
        import onnxruntime
    except ImportError:
        return None
    import io
    import warnings

    if zipmap:
        # Appended, not put first: a tree given on PYTHONPATH (a "before" run) keeps its
        # otel_dl.
        sys.path.append(str(Path(__file__).resolve().parents[1]))
        from tests.onnx_models import zipmap_classifier

        graph = zipmap_classifier(np.random.default_rng(1).normal(size=(10, 32)) * 0.1)
    else:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            # The TorchScript exporter's deprecation notice.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                _mlp().eval(),
                (torch.randn(batch, 32),),
                buffer,
                input_names=["x"],
                dynamic_axes={"x": {0: "rows"}},
                dynamo=False,
            )
        graph = buffer.getvalue()
    options = onnxruntime.SessionOptions()
    # One thread, as torch here: ONNX Runtime's default pool keeps a thread per core
    # spinning after each run, which on a pinned run shares the one core with the caller.
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    feed = {"x": np.random.default_rng(0).normal(size=(batch, 32)).astype(np.float32)}

    def traced() -> Any:
        return session.run(None, feed)

    def bare() -> Any:
        with suppress_instrumentation():
            return session.run(None, feed)

    _learn(session, traced)
    return _paired(bare, traced, 300 if batch > 1 else 2000, repeats)


def _sklearn_case(repeats: int) -> tuple[float, float] | None:
    """One request at a time: ``predict_proba`` of a logistic regression on one iris row."""
    try:
        from sklearn.datasets import load_iris
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return None
    x, y = load_iris(return_X_y=True)
    with suppress_instrumentation():
        estimator = LogisticRegression(max_iter=500).fit(x, y)
    return _requests(estimator, x[:1], 2000, repeats)


def _requests(estimator: Any, row: Any, calls: int, repeats: int) -> tuple[float, float]:
    """``predict_proba`` of one row per call, bare (instrumentation suppressed) and traced."""

    def traced() -> Any:
        return estimator.predict_proba(row)

    def bare() -> Any:
        with suppress_instrumentation():
            return estimator.predict_proba(row)

    _learn(estimator, traced)
    return _paired(bare, traced, calls, repeats)


def _booster_case(repeats: int) -> tuple[float, float] | None:
    """One request at a time to a native XGBoost booster, as serving code loads one:
    ``inplace_predict`` of one breast-cancer row (30 features; binary:logistic, 50 trees)."""
    try:
        import xgboost
        from sklearn.datasets import load_breast_cancer
    except ImportError:
        return None
    x, y = load_breast_cancer(return_X_y=True)
    params = {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}
    with suppress_instrumentation():
        booster = xgboost.train(params, xgboost.DMatrix(x, label=y), 50)
    row = x[:1]

    def traced() -> Any:
        return booster.inplace_predict(row)

    def bare() -> Any:
        with suppress_instrumentation():
            return booster.inplace_predict(row)

    _learn(booster, traced)
    return _paired(bare, traced, 2000, repeats)


def _sklearn_frame_case(repeats: int) -> tuple[float, float] | None:
    """One request at a time as a pandas DataFrame row, the way tabular services often get
    it: ``predict_proba`` of a scaler + logistic regression pipeline on one row of the
    breast-cancer data set (30 named float columns)."""
    try:
        from sklearn.datasets import load_breast_cancer
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError:
        return None
    x, y = load_breast_cancer(return_X_y=True, as_frame=True)
    with suppress_instrumentation():
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    return _requests(pipeline, x.iloc[:1], 1000, repeats)


def _transformers_case(repeats: int) -> tuple[float, float] | None:
    """One request at a time to a transformers ``text-classification`` pipeline: a tiny
    BERT (one layer of 16, ``tests.support``) with a tokenizer built here, one short text
    per call."""
    try:
        from transformers import pipeline
    except ImportError:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # built here: nothing comes from the Hub
    sys.path.append(str(Path(__file__).resolve().parents[1]))  # after a PYTHONPATH tree
    from tests.support import tiny_bert_classifier, tiny_tokenizer

    classify = pipeline(
        "text-classification", model=tiny_bert_classifier(num_labels=3), tokenizer=tiny_tokenizer()
    )
    text = "the cat sat on the mat"

    def traced() -> Any:
        return classify(text)

    def bare() -> Any:
        with suppress_instrumentation():
            return classify(text)

    return _paired(bare, traced, 300, repeats)


def _gpu_rows(repeats: int) -> list[tuple[str, float, float, str]]:
    """CUDA cases: per call including the GPU's work (a synchronize closes each block, for
    bare and traced alike), and the host time of launching calls (no synchronize: what the
    caller's thread spends; otel-dl must not block it)."""
    device = torch.device("cuda")
    rows: list[tuple[str, float, float, str]] = []
    for label, make, x, calls, target in (
        ("CUDA MLP 32-256-10, batch 256", _mlp, torch.randn(256, 32), 500, "added <= 2 x floor"),
        ("CUDA CNN forward, batch 32", _cnn, torch.randn(32, 3, 32, 32), 200, "<= 1.02"),
    ):
        bare_model = make().to(device)
        with suppress_instrumentation():
            bare_model.eval()
        traced_model = otel_dl.watch(make().to(device).eval(), name="bench-cuda")
        traced_model.load_state_dict(bare_model.state_dict())
        x = x.to(device)

        def block(model: torch.nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            def run() -> None:
                for _ in range(10):
                    model(x)
                torch.cuda.synchronize()

            return run

        def launch(model: torch.nn.Module, x: torch.Tensor = x) -> Callable[[], Any]:
            return lambda: model(x)

        with torch.inference_mode():
            bare, traced = _paired(block(bare_model), block(traced_model), calls // 10, repeats)
            rows.append((f"{label} (with GPU time)", bare / 10, traced / 10, target))
            torch.cuda.synchronize()
            bare, traced = _paired(launch(bare_model), launch(traced_model), calls, repeats)
            torch.cuda.synchronize()
            rows.append((f"{label} (host launch only)", bare, traced, "never blocks"))
    return rows


def _suppressed_case(repeats: int) -> tuple[float, float]:
    """An MLP call on one row under ``suppress_instrumentation()``: the wrapper's cost."""
    with suppress_instrumentation():
        bare_model = _mlp().eval()  # eval() under suppression: stays untraced
    traced_model = otel_dl.watch(_mlp().eval())
    x = torch.randn(1, 32)

    def suppressed(model: torch.nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with suppress_instrumentation():
                return model(x)

        return call

    with torch.inference_mode():
        return _paired(suppressed(bare_model), suppressed(traced_model), 2000, repeats)


def _gc_case(seconds: float) -> list[tuple[str, int, int, float, float]]:
    """Full garbage collections during a one-request serving loop (a watched 1-module
    model, one row per call), bare, instrumented, and instrumented after ``gc.freeze()``.

    Spans waiting in the export queue live long enough to reach Python's oldest
    generation, and each full collection walks every object the process holds (torch's
    included): one pause per so many calls, which a median of blocks never shows.
    ``gc.freeze()`` moves what exists at that moment out of the walk.
    Rows: (loop, calls, full collections, mean and longest pause in ms)."""
    pauses: list[float] = []
    began = [0.0]

    def watch(phase: str, info: dict[str, Any]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    bare, traced = _pair(lambda: _Deep(1), "bench-gc")
    x = torch.randn(1, 4)
    rows = []
    with torch.inference_mode():
        _learn(traced, lambda: traced(x))
        for label, model, freeze in (
            ("bare", bare, False),
            ("otel-dl", traced, False),
            ("otel-dl, gc.freeze() after loading", traced, True),
        ):
            gc.collect()
            if freeze:
                gc.freeze()
            pauses.clear()
            gc.callbacks.append(watch)
            calls, start = 0, time.perf_counter()
            try:
                while time.perf_counter() - start < seconds:
                    for _ in range(1000):
                        model(x)
                    calls += 1000
            finally:
                gc.callbacks.remove(watch)
                if freeze:
                    gc.unfreeze()
            mean = statistics.mean(pauses) * 1e3 if pauses else 0.0
            rows.append((label, calls, len(pauses), mean, max(pauses, default=0.0) * 1e3))
    return rows


def _idle_case(calls: int, gap_s: float = 0.005) -> list[tuple[str, float, float, float]]:
    """One request at a time with an idle gap before each (a served model between
    requests), bare and instrumented, alternating: per-call latency, median and p99 in
    µs. After a gap the caches are cold, so every line of code on the call's path costs
    several times what a tight loop measures. Rows: (model, bare median, instrumented
    median, instrumented p99 minus bare p99)."""
    bare, traced = _pair(lambda: _Deep(1), "bench-idle")
    x = torch.randn(1, 4)
    tracer = trace.get_tracer("bench")
    attrs = _FLOOR_ATTRIBUTES

    def in_bare_span() -> None:
        span = tracer.start_span("inference", attributes=attrs)
        bare(x)
        span.end()

    times: dict[str, list[float]] = {"bare": [], "bare span": [], "otel-dl": []}
    calls_of = {"bare": lambda: bare(x), "bare span": in_bare_span, "otel-dl": lambda: traced(x)}
    with torch.inference_mode():
        _learn(traced, lambda: traced(x))
        for _ in range(calls):
            for label, call in calls_of.items():
                time.sleep(gap_s)
                start = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - start)

    def q(values: list[float], p: float) -> float:
        return float(np.percentile(values, p)) * 1e6

    b = times["bare"]
    return [
        (
            f"{label}, 1 row, {gap_s * 1e3:g} ms idle before each",
            q(b, 50),
            q(times[label], 50),
            q(times[label], 99) - q(b, 99),
        )
        for label in ("bare span", "otel-dl")
    ]


CASES = (
    "dataloader",
    "cnn",
    "mlp",
    "small",
    "onnx",
    "sklearn",
    "transformers",
    "suppressed",
    "gc",
    "idle",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: the GPU cases only (a CUDA device is needed)",
    )
    parser.add_argument(
        "--cases",
        default="",
        help=f"comma-separated subset of the CPU cases ({','.join(CASES)}; default: all)",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="pin the process and its threads to this core (default: not pinned)",
    )
    parser.add_argument(
        "--duration-metric",
        action="store_true",
        help="instrument with duration_metric on: each span also records dl.operation.duration",
    )
    arguments = parser.parse_args()
    if arguments.cpu is not None:
        os.sched_setaffinity(0, {arguments.cpu})
    repeats = arguments.repeats
    torch.set_num_threads(1)
    provider = TracerProvider()
    sink = Discard()
    provider.add_span_processor(BatchSpanProcessor(sink, max_queue_size=100_000))
    trace.set_tracer_provider(provider)
    # A meter provider with a reader, as under the default OTLP metrics exporter: with
    # --duration-metric each span's duration record is aggregated (never exported here).
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    record = arguments.duration_metric
    handle = otel_dl.instrument(metrics_exporter="none", duration_metric=record)
    rows: list[tuple[str, float, float, str]] = []
    floor = _floor(repeats)
    if arguments.device == "cuda":
        rows = _gpu_rows(repeats)
        handle.shutdown()
        _print(floor, rows)
        return

    cases = set(arguments.cases.split(",")) if arguments.cases else set(CASES)
    if "dataloader" in cases:
        bare, traced = _dataloader_case(repeats)
        rows.append(("DataLoader 100k x 32 f32, batch 256 (per batch)", bare, traced, "<= 1.10"))
        bare, traced = _dataloader_case(repeats, with_model=True)
        rows.append(("DataLoader + MLP loop (per batch)", bare, traced, "<= 1.10"))
        bare, traced = _dataloader_case(repeats, with_model=True, sample_every=10)
        rows.append(("DataLoader + MLP loop, sample_every=10", bare, traced, "<= 1.03"))
        bare, traced = _dataloader_case(repeats, with_model=True, sample_every=10, presample=False)
        rows.append(("  the same, every span made (presample off)", bare, traced, "reference"))
    if "cnn" in cases:
        bare, traced = _model_case(_cnn, torch.randn(32, 3, 32, 32), 40, repeats)
        rows.append(("CNN forward, batch 32 of 3x32x32", bare, traced, "<= 1.02"))
    if "mlp" in cases:
        bare, traced = _model_case(_mlp, torch.randn(256, 32), 500, repeats)
        rows.append(("MLP 32-256-10, batch 256", bare, traced, "added <= 2 x floor"))
    diff: float | None = None
    if "small" in cases:
        deep_bare, deep_traced = _model_case(lambda: _Deep(50), torch.randn(1, 4), 1000, repeats)
        rows.append(("50-submodule model, batch 1", deep_bare, deep_traced, "added within 10 us"))
        one_bare, one_traced = _model_case(lambda: _Deep(1), torch.randn(1, 4), 1000, repeats)
        rows.append(("1-module model, batch 1", one_bare, one_traced, "added <= 2 x floor"))
        diff = ((deep_traced - deep_bare) - (one_traced - one_bare)) * 1e6
    if "onnx" in cases:
        onnx = _onnx_case(repeats, 256)
        if onnx is not None:
            rows.append(("ONNX Runtime MLP session, batch 256", *onnx, "added <= 2 x floor"))
        onnx = _onnx_case(repeats, 1)
        if onnx is not None:
            rows.append(("ONNX Runtime MLP session, batch 1", *onnx, "added <= 2 x floor"))
        onnx = _onnx_case(repeats, 256, zipmap=True)
        if onnx is not None:
            rows.append(("ONNX Runtime ZipMap classifier, batch 256", *onnx, "added <= 2 x floor"))
    if "sklearn" in cases:
        sklearn = _sklearn_case(repeats)
        if sklearn is not None:
            rows.append(("scikit-learn predict_proba, 1 row", *sklearn, "added <= 2 x floor"))
        booster = _booster_case(repeats)
        if booster is not None:
            rows.append(("XGBoost Booster.inplace_predict, 1 row", *booster, "added <= 2 x floor"))
        frame = _sklearn_frame_case(repeats)
        if frame is not None:
            rows.append(("scikit-learn pipeline, 1 DataFrame row", *frame, "added <= 2 x floor"))
    if "transformers" in cases:
        text = _transformers_case(repeats)
        if text is not None:
            rows.append(("transformers text-classification, 1 text", *text, "added <= 2 x floor"))
    if "suppressed" in cases:
        rows.append(
            ("suppressed wrapper (MLP batch 1)", *_suppressed_case(repeats), "<= 1.5 us added")
        )
    collections = _gc_case(10.0) if "gc" in cases else []
    idle = _idle_case(200 * repeats) if "idle" in cases else []
    handle.shutdown()  # flushes: the sink's last span is the last case's last span
    _print(floor, rows)
    last = sink.last
    if last is not None and last.name == semconv.SPAN_INFERENCE and last.attributes:
        attrs = dict(last.attributes)
        contract = _contract_floor(repeats, attrs, record)
        with_record = ", and 1 duration record" if record else ""
        print(
            f"\nthe span otel-dl makes, from the SDK alone ({len(attrs)} attributes, as on "
            f"the last case's spans{with_record}) = {contract * 1e6:.1f} us, "
            f"{contract / floor:.2f} x floor:\nof a model row's added cost, that much is "
            "the SDK's; the rest is otel-dl's own work"
        )
    if diff is not None:
        print(f"\nadded cost, 50 submodules minus 1 module: {diff:+.1f} us (target: within 10 us)")
    if idle:
        print(
            f"\n{'cold calls: 1-module model, medians':<48} {'bare us':>10} {'with us':>11} "
            f"{'added us':>9} {'x cold floor':>12} {'p99 added':>10}"
        )
        cold_floor = idle[0][2] - idle[0][1]
        for label, b, t, p99 in idle:
            print(
                f"{label:<48} {b:>10.1f} {t:>11.1f} {t - b:>9.1f} "
                f"{(t - b) / cold_floor:>12.2f} {p99:>10.1f}"
            )
    if collections:
        print(
            f"\n{'full collections, 1-module model, batch 1, 10 s':<48} {'calls':>9} "
            f"{'full GCs':>9} {'mean ms':>8} {'max ms':>8}"
        )
        for label, calls, count, mean, longest in collections:
            print(f"{label:<48} {calls:>9} {count:>9} {mean:>8.1f} {longest:>8.1f}")


def _print(floor: float, rows: list[tuple[str, float, float, str]]) -> None:
    print(f"floor: bare SDK span with 10 attributes = {floor * 1e6:.1f} us\n")
    print(
        f"{'case':<48} {'bare us':>10} {'otel-dl us':>11} {'ratio':>7} "
        f"{'added us':>9} {'x floor':>8}  target"
    )
    for name, b, t, target in rows:
        added = (t - b) * 1e6
        print(
            f"{name:<48} {b * 1e6:>10.1f} {t * 1e6:>11.1f} {t / b:>7.3f} "
            f"{added:>9.1f} {added / (floor * 1e6):>8.2f}  {target}"
        )


if __name__ == "__main__":
    main()
