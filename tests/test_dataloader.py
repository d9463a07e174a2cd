"""The DataLoader instrumentor on a real torch DataLoader."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from opentelemetry.trace import StatusCode
from torch.utils.data import DataLoader, Dataset, TensorDataset

import otel_dl
from otel_dl import semconv
from tests.support import SpanList


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


def test_each_span_records_one_low_cardinality_duration(spans: SpanList) -> None:
    from tests.support import metric_points

    before = sum(
        p.count
        for p in metric_points(semconv.METRIC_OPERATION_DURATION)
        if p.attributes.get(semconv.DL_STAGE) == "dataloader"
    )
    x = torch.randn(1500, 3, generator=torch.Generator().manual_seed(5))
    list(DataLoader(TensorDataset(x), batch_size=250))
    points = [
        p
        for p in metric_points(semconv.METRIC_OPERATION_DURATION)
        if p.attributes.get(semconv.DL_STAGE) == "dataloader"
    ]
    assert sum(p.count for p in points) - before == 6  # one record per batch span
    for point in points:
        assert set(point.attributes) <= {semconv.DL_STAGE, semconv.DL_COMPONENT}
