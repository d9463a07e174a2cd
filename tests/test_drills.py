"""otel_dl.testing: fault drills on real parts (a DataLoader, a torch model, a scikit-learn
estimator, a requests session to a loopback server), on the demo pipeline with the real
collector, and the drill command in a fresh process."""

from __future__ import annotations

import gc
import http.server
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from torch.utils.data import DataLoader, TensorDataset

import otel_dl
from otel_dl import semconv
from otel_dl.collector.catalog import load_catalog
from otel_dl.testing import DrillError, Fault, Faults, InjectedFault, fault_for, run_drills
from otel_dl.testing.faults import DRIFT_FACTOR, SLOW_SECONDS
from tests.support import SpanList

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "examples" / "pipeline"


@pytest.fixture
def instrumented() -> Iterator[otel_dl.Instrumentation]:
    handle = otel_dl.instrument()
    yield handle
    handle.shutdown()


def _dataset() -> tuple[TensorDataset, otel_dl.Reference]:
    x, y = load_iris(return_X_y=True)
    features = torch.from_numpy(x.astype(np.float32))
    return TensorDataset(features, torch.from_numpy(y)), otel_dl.Reference.fit(features.numpy())


# --- the injectors, on real parts ---------------------------------------------------------------


def test_no_fault_returns_every_part_unchanged() -> None:
    faults = Faults()
    parts = [DataLoader(_dataset()[0]), torch.nn.Linear(2, 2), requests.Session(), object()]
    assert faults.batches(parts[0]) is parts[0]
    assert faults.model(parts[1]) is parts[1]
    assert faults.http(parts[2]) is parts[2]
    assert faults.feature_store(parts[3]) is parts[3]
    assert faults.offered == {"batches", "model", "http", "feature_store"}
    assert not faults.applied


@pytest.mark.parametrize(
    ("action", "attribute", "expected"),
    [
        ("nan", semconv.DL_QUALITY_NAN_FRACTION, 0.2),
        ("schema", semconv.DL_QUALITY_SCHEMA_MISMATCH, True),
    ],
)
def test_dataloader_faults_show_on_its_own_batch_span(
    action: str, attribute: str, expected: Any, instrumented: Any, spans: SpanList
) -> None:
    dataset, reference = _dataset()
    loader = otel_dl.watch(DataLoader(dataset, batch_size=50), reference=reference)
    original = loader.collate_fn
    faults = Faults(Fault("batches", action))
    next(iter(faults.batches(loader)))
    faults.close()
    (span,) = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert span.attributes[attribute] == pytest.approx(expected)
    assert loader.collate_fn is original
    clean, _ = next(iter(loader))
    assert not torch.isnan(clean).any() and clean.shape == (50, 4)


def test_dataset_and_iterable_faults() -> None:
    dataset, _ = _dataset()
    drifted = Faults(Fault("batches", "drift")).batches(dataset)
    assert len(drifted) == len(dataset)
    assert drifted[3][0][-1] == pytest.approx(float(dataset[3][0][-1]) * DRIFT_FACTOR)
    blanked = Faults(Fault("batches", "nan")).batches(dataset)
    assert torch.isnan(blanked[0][0]).all() and not torch.isnan(blanked[1][0]).any()
    batches = [np.ones((4, 3)), np.ones((4, 3))]
    wider = list(Faults(Fault("batches", "schema")).batches(batches))
    assert [b.shape for b in wider] == [(4, 4), (4, 4)]
    assert batches[0].shape == (4, 3)  # the caller's arrays are never changed


def test_torch_model_faults_apply_inside_the_call_and_are_undone(
    instrumented: Any, spans: SpanList
) -> None:
    torch.manual_seed(0)
    model = otel_dl.watch(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3)))
    model.eval()
    x = torch.randn(16, 4)
    with torch.no_grad():
        before = model(x)
        for action in ("swap", "unsure", "slow", "fail"):
            faults = Faults(Fault("model", action))
            faulty = faults.model(model)
            started = time.monotonic()
            if action == "fail":
                with pytest.raises(InjectedFault):
                    faulty(x)
            else:
                out = faulty(x)
            elapsed = time.monotonic() - started
            faults.close()
            if action == "unsure":
                assert torch.equal(out, torch.zeros_like(out))
            if action == "swap":
                assert not torch.allclose(out, before)
            if action == "slow":
                assert elapsed >= SLOW_SECONDS
            assert torch.equal(model(x), before)  # undone
    inference = spans.get(semconv.SPAN_INFERENCE)
    prints = [s.attributes[semconv.DL_MODEL_FINGERPRINT] for s in inference]
    # healthy, swapped, then healthy again after every later call
    assert prints[1] != prints[0] and len(set(prints[2:])) == 1 and prints[2] == prints[0]
    assert any(
        s.attributes.get(semconv.DL_CONFIDENCE_MEAN) == pytest.approx(1 / 3) for s in inference
    )


def test_estimator_swap_is_another_fitted_estimator() -> None:
    x, y = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(x, y)
    coef = model.coef_.copy()
    swapped = Faults(Fault("model", "swap")).model(model)
    assert swapped is not model
    assert not np.allclose(swapped.predict_proba(x), model.predict_proba(x))
    np.testing.assert_array_equal(model.coef_, coef)


class _Handler(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_POST(self) -> None:
        type(self).hits += 1
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_http_faults_on_a_real_session(server: str, instrumented: Any, spans: SpanList) -> None:
    session = requests.Session()
    assert session.post(server, json={}).ok
    hits = _Handler.hits
    slow = Faults(Fault("http", "slow"))
    started = time.monotonic()
    assert slow.http(session).post(server, json={}).ok
    assert time.monotonic() - started >= SLOW_SECONDS
    slow.close()
    failing = Faults(Fault("http", "fail"))
    reply = failing.http(session).post(server, json={})
    failing.close()
    assert reply.status_code == 503 and _Handler.hits == hits + 1  # never reached the server
    assert session.post(server, json={}).ok and _Handler.hits == hits + 2
    client = [s for s in spans.get() if s.kind.name == "CLIENT"]
    assert [
        s.attributes.get("http.status_code", s.attributes.get("http.response.status_code"))
        for s in client
    ] == [200, 200, 503, 200]


def test_bad_fault_names_the_choices() -> None:
    with pytest.raises(ValueError, match="batches: drift, nan, schema"):
        Fault("batches", "slow")


def test_every_default_catalog_mode_has_a_fault() -> None:
    for mode in load_catalog().modes:
        assert fault_for(mode) is not None, mode.id


# --- run_drills ---------------------------------------------------------------------------------


class _Tiny:
    """A DataLoader feeding a watched torch model: no feature store, no HTTP."""

    def __init__(self) -> None:
        self.dataset, self.reference = _dataset()
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 3))
        otel_dl.watch(self.model, name="iris", reference=self.reference)
        self.model.eval()

    def __call__(self, faults: Faults) -> None:
        loader = otel_dl.watch(
            DataLoader(self.dataset, batch_size=75, shuffle=False), reference=self.reference
        )
        model = faults.model(self.model)
        with torch.no_grad():
            for x, _ in faults.batches(loader):
                with otel_dl.stage("score", signals=False):
                    model(x)


def test_drills_without_a_collector_report_what_was_not_drilled(
    instrumented: Any, spans: SpanList
) -> None:
    report = run_drills(_Tiny(), baseline_runs=3, fault_runs=1, recovery_runs=1)
    stale = report.by_mode("stale-features")
    assert not stale.drilled and "faults.feature_store()" in stale.note
    assert not report.by_mode("external-dependency-error").drilled
    for mode in ("data-quality-nan", "schema-mismatch", "model-change", "internal-error"):
        assert report.by_mode(mode).detected, report.table()
    assert report.by_mode("internal-error").note == "the pipeline raised InjectedFault"
    assert all(r.attributed is None for r in report.results)
    assert "no collector: attribution not checked" in report.table()


def test_a_pipeline_failing_when_healthy_cannot_be_drilled(instrumented: Any) -> None:
    def broken(faults: Faults) -> None:
        raise OSError("input bucket missing")

    with pytest.raises(DrillError, match="OSError on a healthy run: input bucket missing"):
        run_drills(broken, baseline_runs=1)
    with pytest.raises(DrillError, match="no mode \\['nope'\\]"):
        run_drills(_Tiny(), modes=["nope"])


def test_full_collections_are_short_during_a_drill_and_restored_after(
    instrumented: Any,
) -> None:
    """A full collection walks every object the process holds (a quarter of a second with
    torch and Feast loaded): one inside a healthy run made its span look slow to the
    collector. The drill freezes what exists when it starts, and gives it back after."""
    tiny = _Tiny()
    seen: list[int] = []

    def pipeline(faults: Faults) -> None:
        seen.append(gc.get_freeze_count())
        tiny(faults)

    assert gc.get_freeze_count() == 0
    run_drills(pipeline, modes=["model-change"], baseline_runs=2, fault_runs=1)
    assert seen and all(count > 0 for count in seen)
    assert gc.get_freeze_count() == 0
    # A process that froze objects itself keeps them frozen, and only them.
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        seen.clear()
        run_drills(pipeline, modes=["model-change"], baseline_runs=2, fault_runs=1)
        # (Frozen objects freed by reference counting leave the count.)
        assert seen and all(0 < count <= frozen for count in seen)
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()


def test_demo_pipeline_drills_with_the_collector(fault_drills: Any) -> None:
    sys.path.insert(0, str(PIPELINE))
    try:
        from drills import DemoPipeline  # examples/pipeline/drills.py

        with DemoPipeline() as pipeline:
            report = fault_drills(pipeline, collector=True)
    finally:
        sys.path.remove(str(PIPELINE))
    print(report.table())
    assert all(r.drilled for r in report.results), report.table()
    report.assert_detected()
    assert report.baseline_faults == 0, report.table()
    # A failing enrichment API is answered by the pipeline's own fallback (risk 0.5): the
    # trace shows no symptom of its own, so attribution is checked on the other modes.
    unattributed = [r.mode.id for r in report.results if not r.attributed]
    assert set(unattributed) <= {"external-dependency-error"}, report.table()


def test_drill_command_in_a_fresh_process(tmp_path: Path) -> None:
    (tmp_path / "tiny.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch.utils.data import DataLoader, TensorDataset

            import otel_dl

            otel_dl.instrument(
                "tiny", traces_exporter="none", metrics_exporter="none", drift_min_rows=100
            )
            torch.manual_seed(0)
            X = torch.randn(400, 4)
            REFERENCE = otel_dl.Reference.fit(X.numpy())
            MODEL = torch.nn.Linear(4, 3).eval()
            with torch.no_grad():
                MODEL.weight *= 30  # a confident model: its healthy calls are not low-confidence


            def pipeline(faults):
                otel_dl.watch(MODEL, name="tiny", reference=REFERENCE)
                loader = otel_dl.watch(DataLoader(TensorDataset(X), batch_size=100),
                                       reference=REFERENCE)
                model = faults.model(MODEL)
                with torch.no_grad():
                    for (x,) in faults.batches(loader):
                        model(x)
            """
        )
    )
    done = subprocess.run(
        [sys.executable, "-m", "otel_dl.testing", f"{tmp_path / 'tiny.py'}:pipeline"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )
    assert "| schema-mismatch | schema_mismatch | batches: schema | yes | yes: " in done.stdout
    assert "| stale-features | stale_features | feature_store: stale | no: " in done.stdout
    assert done.returncode == 0, done.stdout + done.stderr
