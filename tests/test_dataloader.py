"""The DataLoader instrumentor on a real torch DataLoader."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from torch.utils.data import DataLoader, Dataset, TensorDataset

import otel_dl
from otel_dl import _burst, semconv
from otel_dl._config import get_config, set_config
from otel_dl.sampling import SignalAwareSpanProcessor
from tests.support import InternalErrors, SpanList


@pytest.fixture(autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument()
    yield h
    h.shutdown()


class DictDataset(Dataset[dict[str, torch.Tensor]]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.full((3,), float(i)), "ids": torch.tensor(i), "w": torch.tensor(1.0)}


def test_one_span_per_batch_nested_under_current_span(spans: SpanList, tracer) -> None:
    loader = DataLoader(TensorDataset(torch.randn(25, 4), torch.arange(25)), batch_size=10)
    with tracer.start_as_current_span("epoch") as epoch:
        batches = list(loader)
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert len(got) == len(batches) == 3
    assert [s.attributes[semconv.DL_BATCH_INDEX] for s in got] == [0, 1, 2]
    assert [s.attributes[semconv.DL_BATCH_SIZE] for s in got] == [10, 10, 5]
    for span in got:
        assert span.parent.span_id == epoch.get_span_context().span_id
        assert span.status.status_code is StatusCode.UNSET
        assert span.attributes[semconv.DL_STAGE] == "dataloader"
        assert span.attributes[semconv.DL_COMPONENT] == "torch.dataloader"
        assert span.attributes[semconv.DL_DATASET_CLASS].endswith("TensorDataset")


def test_end_of_iteration_makes_no_span_and_no_error(spans: SpanList) -> None:
    loader = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=4)
    for _epoch in range(3):
        list(loader)
    got = spans.get()
    assert len(got) == 3
    assert all(s.status.status_code is StatusCode.UNSET for s in got)


class _FailsAt(Dataset[torch.Tensor]):
    def __init__(self, bad: int) -> None:
        self.bad = bad
        self.error = ValueError(f"row {bad} is corrupt")

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:
        if i == self.bad:
            raise self.error
        return torch.full((3,), float(i))


def test_a_failed_batch_gets_its_own_index_and_the_users_exception(spans: SpanList) -> None:
    dataset = _FailsAt(12)
    with pytest.raises(ValueError) as raised:
        for _ in DataLoader(dataset, batch_size=4):
            pass
    assert raised.value is dataset.error
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert [s.attributes[semconv.DL_BATCH_INDEX] for s in got] == [0, 1, 2, 3]
    assert [s.status.status_code for s in got] == [StatusCode.UNSET] * 3 + [StatusCode.ERROR]
    assert got[-1].attributes["error.type"] == "ValueError"


def test_watch_attaches_provenance(spans: SpanList) -> None:
    loader = otel_dl.watch(
        DataLoader(TensorDataset(torch.randn(8, 2)), batch_size=4),
        source="s3://bucket/day.parquet",
        version="2026-11-23",
        owner="ranking",
    )
    list(loader)
    span = spans.get()[0]
    assert span.attributes[semconv.DL_DATA_SOURCE] == "s3://bucket/day.parquet"
    assert span.attributes[semconv.DL_DATA_VERSION] == "2026-11-23"
    assert span.attributes["owner"] == "ranking"


def test_dict_batches_use_float_tensors(spans: SpanList) -> None:
    list(DataLoader(DictDataset(), batch_size=5))
    sizes = [s.attributes[semconv.DL_BATCH_SIZE] for s in spans.get()]
    assert sizes == [5, 5, 2]


def test_a_scalar_or_per_batch_tensor_beside_the_features_costs_no_signal(
    spans: SpanList,
) -> None:
    """A collate_fn adding a temperature (0-d) or class weights (10,) to the rows: only
    the tensors of one row per sample are read, and get what they get alone."""
    x = torch.randn(60, 6)
    x[:, 0] = float("nan")  # a sixth of every batch

    def extras(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "x": torch.stack([r[0] for r in rows]),
            "temperature": torch.tensor(0.7),
            "class_weights": torch.ones(10),
        }

    def alone(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {"x": torch.stack([r[0] for r in rows])}

    errors = InternalErrors()
    nan = {}
    for name, collate in (("extras", extras), ("alone", alone)):
        spans.clear()
        list(DataLoader(TensorDataset(x), batch_size=20, collate_fn=collate))
        got = spans.get(semconv.SPAN_DATALOADER_BATCH)
        nan[name] = [s.attributes.get(semconv.DL_QUALITY_NAN_FRACTION) for s in got]
        assert [s.attributes[semconv.DL_BATCH_SIZE] for s in got] == [20, 20, 20]
    assert nan["extras"] == nan["alone"] == [pytest.approx(1 / 6)] * 3
    assert not errors.new()


@dataclasses.dataclass
class _Batch:
    x: torch.Tensor
    names: list[str]


def test_a_batch_of_token_ids_has_its_size_and_no_features(spans: SpanList) -> None:
    """A tokenized text batch, as transformers' Trainer loads it: integer tensors only."""

    class Tokens(Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return 10

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            ids = torch.arange(i, i + 8)
            mask = torch.ones(8, dtype=torch.long)
            return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor(1)}

    list(DataLoader(Tokens(), batch_size=4))
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert [s.attributes[semconv.DL_BATCH_SIZE] for s in got] == [4, 4, 2]
    assert not any(semconv.DL_QUALITY_NAN_FRACTION in s.attributes for s in got)


def test_a_dataclass_batch_reads_as_its_fields(spans: SpanList) -> None:
    x = torch.randn(40, 3)
    x[:, 1] = float("nan")

    def collate(rows: list[tuple[torch.Tensor]]) -> _Batch:
        return _Batch(torch.stack([r[0] for r in rows]), [f"row{i}" for i in range(len(rows))])

    list(DataLoader(TensorDataset(x), batch_size=10, collate_fn=collate))
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert [s.attributes[semconv.DL_BATCH_SIZE] for s in got] == [10] * 4
    assert [s.attributes[semconv.DL_QUALITY_NAN_FRACTION] for s in got] == [
        pytest.approx(1 / 3)
    ] * 4


class Images(Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """Images of several sizes with their boxes, as a detection data set holds them."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = torch.rand(3, 20 + i, 30, generator=torch.Generator().manual_seed(i))
        return image, {"boxes": torch.tensor([[1.0, 2.0, 8.0, 9.0]]), "labels": torch.tensor([1])}


@pytest.mark.parametrize(
    ("how", "collate"),
    [
        ("images", lambda samples: [image for image, _ in samples]),
        ("samples", lambda samples: samples),
        ("transposed", lambda samples: tuple(zip(*samples, strict=True))),
    ],
)
def test_samples_a_collate_fn_leaves_uncollated_are_counted_not_profiled(
    how: str, collate: Any, spans: SpanList
) -> None:
    """``collate_fn=lambda b: tuple(zip(*b))`` (detection models) or a list of images of
    several sizes: the first tensor is one sample, whose channels were read as rows."""
    errors = InternalErrors()
    batches = list(DataLoader(Images(), batch_size=4, collate_fn=collate))
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert len(got) == len(batches) == 3
    assert [s.attributes[semconv.DL_BATCH_SIZE] for s in got] == [4, 4, 2]
    for span in got:
        assert not any(key.startswith(("dl.drift.", "dl.quality.")) for key in span.attributes)
    assert errors.new() == {}


def test_a_collate_fn_that_stacks_is_read_as_before(spans: SpanList) -> None:
    def pad(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples])]

    data = TensorDataset(torch.randn(10, 4), torch.randn(10, 4))
    list(DataLoader(data, batch_size=4, collate_fn=pad))
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert [s.attributes[semconv.DL_BATCH_SIZE] for s in got] == [4, 4, 2]
    assert all(semconv.DL_QUALITY_NAN_FRACTION in s.attributes for s in got)


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_worker_processes_and_start_methods(method: str, spans: SpanList) -> None:
    loader = DataLoader(
        TensorDataset(torch.randn(64, 4)),
        batch_size=8,
        num_workers=2,
        multiprocessing_context=method,
        persistent_workers=True,
        pin_memory=False,
    )
    for _epoch in range(2):
        assert len(list(loader)) == 8
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    assert len(got) == 16
    assert sorted(s.attributes[semconv.DL_BATCH_INDEX] for s in got) == sorted(list(range(8)) * 2)


def test_pin_memory_batches(spans: SpanList) -> None:
    with pytest.warns(UserWarning) if not torch.cuda.is_available() else _nullcontext():
        loader = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=8, pin_memory=True)
        assert len(list(loader)) == 2
    assert len(spans.get(semconv.SPAN_DATALOADER_BATCH)) == 2


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_batches_carry_drift_quality_and_fingerprints(spans: SpanList) -> None:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6000, 4, generator=generator)
    x[4000:, 2] += 3.0  # batches 16-23 drift on feature 2
    x[5, 0] = float("nan")
    loader = DataLoader(TensorDataset(x), batch_size=250)
    h = otel_dl.instrument()  # the autouse fixture's handle: same one
    assert h.config.baseline_rows == 1000
    assert (h.config.drift_every, h.config.drift_min_rows) == (8, 500)
    list(loader)
    got = spans.get(semconv.SPAN_DATALOADER_BATCH)
    # baseline: batches 0-3; the window reaches drift_min_rows (500) at batch 5, which
    # scores first; it is scored again every 8th batch (13, 21), and the batches between
    # carry the latest score.
    assert not any(semconv.DL_DRIFT_SCORE in s.attributes for s in got[:5])
    first, before, last = got[0], got[5], got[-1]
    assert first.attributes[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(1 / 1000)
    assert before.attributes[semconv.DL_DRIFT_STATUS] == "ok"
    assert before.attributes[semconv.DL_DRIFT_WINDOW_ROWS] == 500
    assert got[12].attributes[semconv.DL_DRIFT_WINDOW_ROWS] == 500  # the score of batch 5
    assert last.attributes[semconv.DL_DRIFT_WINDOW_ROWS] == 18 * 250
    assert last.attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert last.attributes[semconv.DL_DRIFT_FEATURE] == "2"
    assert last.attributes[semconv.DL_DRIFT_METHOD] == "psi"
    fingerprints = {s.attributes[semconv.DL_DATA_FINGERPRINT] for s in got}
    assert len(fingerprints) == len(got)
    assert len({s.attributes[semconv.DL_DATA_SCHEMA_FINGERPRINT] for s in got}) == 1


def _dataloader_durations() -> list[Any]:
    from tests.support import metric_points

    return [
        p
        for p in metric_points(semconv.METRIC_OPERATION_DURATION)
        if p.attributes.get(semconv.DL_STAGE) == "dataloader"
    ]


@pytest.mark.parametrize("recorded", [False, True])
def test_a_duration_record_per_span_only_with_duration_metric(
    spans: SpanList, recorded: bool
) -> None:
    """By default no metric is recorded per batch (the collector derives the duration from
    the spans); with ``duration_metric`` on, each span records one low-cardinality point."""
    config = get_config()
    set_config(dataclasses.replace(config, duration_metric=recorded))
    try:
        before = sum(p.count for p in _dataloader_durations())
        x = torch.randn(1500, 3, generator=torch.Generator().manual_seed(5))
        list(DataLoader(TensorDataset(x), batch_size=250))
        assert len(spans.get(semconv.SPAN_DATALOADER_BATCH)) == 6  # ends the parked batches
        points = _dataloader_durations()
    finally:
        set_config(config)
    assert sum(p.count for p in points) - before == (6 if recorded else 0)
    for point in points:
        assert set(point.attributes) <= {semconv.DL_STAGE, semconv.DL_COMPONENT}


# --- Parked batches: profiled in bursts, spans made then ----------------------------------


def _drifting_batches() -> torch.Tensor:
    """Rows that a learned baseline (the first 1000) finds drifting later, with a NaN, an
    infinity and values far outside the range on the way; 8990 rows, so the last batch
    is a short one."""
    x = torch.randn(8990, 4, generator=torch.Generator().manual_seed(11))
    x[5000:, 1] += 2.5
    x[3100, 0] = float("nan")
    x[4200, 2] = float("inf")
    x[6500:6510, 3] = 40.0
    return x


def _epoch(
    tracer: Any,
    spans: SpanList,
    loader: DataLoader[Any],
    delay_ms: int,
    model: torch.nn.Module | None = None,
    sample_every: int = 1,
) -> tuple[list[Any], list[Any], Any, int, list[tuple[int, int]]]:
    """One epoch of ``loader`` with ``signals_delay_ms=delay_ms``: the batch spans, the
    model spans, the epoch span, the spans parked when the loop ended, and each batch's
    (before ``next()``, after it) times."""
    config = get_config()
    set_config(dataclasses.replace(config, signals_delay_ms=delay_ms, sample_every=sample_every))
    # Spans carry dl.sampling.rate only while a processor samples; this one, on no
    # provider, drops nothing here (presample off): the spans compared are all made.
    sampler = (
        SignalAwareSpanProcessor(SimpleSpanProcessor(InMemorySpanExporter()), sample_every)
        if sample_every > 1
        else None
    )
    try:
        spans.clear()
        times = []
        with torch.inference_mode(), tracer.start_as_current_span("epoch") as epoch:
            iterator = iter(loader)
            while True:
                before = time.time_ns()
                try:
                    (batch,) = next(iterator)
                except StopIteration:
                    break
                times.append((before, time.time_ns()))
                if model is not None:
                    model(batch)
        parked = _burst.pending_spans()
        return (
            spans.get(semconv.SPAN_DATALOADER_BATCH),
            spans.get(semconv.SPAN_INFERENCE),
            epoch,
            parked,
            times,
        )
    finally:
        set_config(config)
        if sampler is not None:
            sampler.shutdown()


def _signals_of(span: Any) -> dict[str, Any]:
    return {k: v for k, v in span.attributes.items() if k.startswith("dl.")}


@pytest.mark.parametrize(
    ("batch_size", "sample_every", "images"),
    [(300, 1, False), (2000, 1, False), (300, 10, False), (300, 1, True)],
)
def test_parked_batches_get_what_they_would_get_at_the_call(
    batch_size: int, sample_every: int, images: bool, spans: SpanList, tracer: Any
) -> None:
    """Batches of 300 rows, and of 2000 (drift is fed a 1024-row subsample of each); with
    sampling, each span's dl.sampling.rate too (1 for an abnormal batch, else 10); and
    the same rows as 1x2x2 images, which wait for the burst as copies."""
    x = _drifting_batches()
    if images:
        x = x.reshape(-1, 1, 2, 2)
    # Two loaders over the same rows: each learns its own baseline and drift window.
    first, second = (DataLoader(TensorDataset(x), batch_size=batch_size) for _ in range(2))
    at_call, _, _, none_parked, _ = _epoch(
        tracer, spans, first, delay_ms=0, sample_every=sample_every
    )
    parked, _, epoch, some_parked, times = _epoch(
        tracer, spans, second, delay_ms=100, sample_every=sample_every
    )
    if sample_every > 1:
        assert {s.attributes[semconv.DL_SAMPLING_RATE] for s in parked} == {1, sample_every}
    assert none_parked == 0 and some_parked > 0
    assert len(at_call) == len(parked) == len(times) == -(-len(x) // batch_size)
    for want, got, (before, after) in zip(at_call, parked, times, strict=True):
        assert _signals_of(got) == _signals_of(want)
        # Made in the burst, with the call's own parent and times.
        assert got.parent.span_id == epoch.get_span_context().span_id
        assert before <= got.start_time <= got.end_time <= after
    statuses = [s.attributes.get(semconv.DL_DRIFT_STATUS) for s in parked]
    assert "alert" in statuses  # the signals under comparison are not all trivial
    assert any(s.attributes[semconv.DL_QUALITY_NAN_FRACTION] > 0 for s in parked)


def test_a_model_given_a_parked_batch_takes_its_profile(spans: SpanList, tracer: Any) -> None:
    x = _drifting_batches()
    torch.manual_seed(0)
    model = otel_dl.watch(torch.nn.Linear(4, 3).eval(), name="scorer")
    loader = DataLoader(TensorDataset(x), batch_size=300)
    batches, calls, epoch, parked, _ = _epoch(tracer, spans, loader, delay_ms=100, model=model)
    assert parked > 0
    assert len(batches) == len(calls) == 30
    keys = (
        semconv.DL_DATA_FINGERPRINT,
        semconv.DL_QUALITY_NAN_FRACTION,
        semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION,
        semconv.DL_DRIFT_STATUS,
        semconv.DL_DRIFT_SCORE,
    )
    for batch, call in zip(batches, calls, strict=True):
        assert call.parent.span_id == epoch.get_span_context().span_id
        assert batch.end_time <= call.start_time  # the model ran after next() returned
        for key in keys:
            assert call.attributes.get(key) == batch.attributes.get(key), key
        assert semconv.DL_CONFIDENCE_MEAN in call.attributes
    # The model's own monitor never profiled a batch: it took the loader's profiles.
    assert otel_dl._watch.ensure_state(model).monitor().feature_count is None


def test_a_failing_burst_costs_parked_batches_their_signals_never_their_spans(
    spans: SpanList, tracer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from otel_dl.monitor import FeatureMonitor

    def broken(*_args: object) -> None:
        raise RuntimeError("injected")

    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(2))
    model = otel_dl.watch(torch.nn.Linear(4, 3).eval(), name="scorer")
    loader = DataLoader(TensorDataset(x), batch_size=250)
    list(loader)  # the baseline is learned
    monkeypatch.setattr(FeatureMonitor, "profile_burst", broken)
    before = otel_dl.internal_error_counts().get("signals.burst", 0)
    batches, calls, _, parked, _ = _epoch(tracer, spans, loader, delay_ms=100, model=model)
    assert parked > 0
    assert len(batches) == len(calls) == 8
    assert otel_dl.internal_error_counts()["signals.burst"] > before
    assert all(semconv.DL_DATA_FINGERPRINT not in s.attributes for s in batches)
    assert [s.attributes[semconv.DL_BATCH_INDEX] for s in batches] == list(range(8))
    assert all(s.attributes[semconv.DL_BATCH_SIZE] == 250 for s in batches)
    assert all(s.attributes[semconv.DL_MODEL_NAME] == "scorer" for s in calls)


def test_parked_batches_go_out_on_force_flush_and_at_exit(
    handle: otel_dl.Instrumentation,
) -> None:
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(4))
    list(DataLoader(TensorDataset(x), batch_size=100))
    assert _burst.pending_spans() > 0
    assert handle.force_flush()
    assert _burst.pending_spans() == 0

    code = (
        "import torch, otel_dl\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "otel_dl.instrument(traces_exporter='console', metrics_exporter='none',"
        " propagation=False)\n"
        "for _ in DataLoader(TensorDataset(torch.randn(3000, 4)), batch_size=100):\n"
        "    pass\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.count('"name": "dataloader.batch"') == 30


def test_a_parked_batch_changed_in_place_keeps_its_own_profile(spans: SpanList) -> None:
    """The copy is taken at ``next()``: the loop's in-place change is not the loader's
    batch, and the model, given the changed tensor, profiles it itself."""
    x = torch.randn(2000, 4, generator=torch.Generator().manual_seed(6))
    model = otel_dl.watch(torch.nn.Linear(4, 3).eval(), name="scorer")
    loader = DataLoader(TensorDataset(x), batch_size=250)
    with torch.no_grad():
        for (batch,) in loader:
            batch[0, 0] = float("nan")  # a version bump: no longer the profiled tensor
            model(batch)
    batches = spans.get(semconv.SPAN_DATALOADER_BATCH)
    calls = spans.get(semconv.SPAN_INFERENCE)
    assert all(s.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 0.0 for s in batches)
    assert all(s.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 1 / 1000 for s in calls)
