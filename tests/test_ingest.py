"""The dataset-reader instrumentor on real pandas, pyarrow and ``datasets`` reads of local
files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from opentelemetry.trace import StatusCode

import otel_dl
from otel_dl import semconv
from otel_dl.instrumentors import ingest as ingest_instrumentor
from otel_dl.instrumentors.ingest import SIGNAL_ROWS
from tests.support import InternalErrors, SpanList, broken_extractor

# Nothing may reach the Hugging Face Hub: the packaged parquet/csv builders run locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def handle() -> Iterator[otel_dl.Instrumentation]:
    h = otel_dl.instrument(include=["ingest"])
    assert "otel_dl_ingest" in h.instrumented
    yield h
    h.shutdown()


def _frame(rows: int, seed: int = 0, shift: float = 0.0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "x": rng.normal(shift, 1.0, rows),
            "y": rng.integers(0, 10, rows),
            "city": rng.choice(["paris", "lyon"], rows),
        }
    )


def test_read_parquet_span(tmp_path: Path, spans: SpanList, tracer) -> None:
    path = tmp_path / "day.parquet"
    _frame(500).to_parquet(path)
    with tracer.start_as_current_span("job") as job:
        frame = pd.read_parquet(path)
    assert len(frame) == 500
    (span,) = spans.get("ingest.read_parquet")
    assert spans.get("ingest.read_table") == []  # pandas reads through pyarrow: one span
    attrs = span.attributes
    assert span.parent.span_id == job.get_span_context().span_id
    assert attrs[semconv.DL_STAGE] == "ingest"
    assert attrs[semconv.DL_COMPONENT] == "ingest"
    assert attrs[semconv.DL_DATA_SOURCE] == str(path)
    assert attrs[semconv.DL_DATA_BYTES] == path.stat().st_size
    assert attrs[semconv.DL_DATA_ROWS] == 500
    assert attrs[semconv.DL_DATA_VERSION].endswith(f"Z/{path.stat().st_size}")
    assert attrs[semconv.DL_QUALITY_NAN_FRACTION] == 0.0
    assert semconv.DL_DATA_FINGERPRINT in attrs
    assert semconv.DL_DATA_SCHEMA_FINGERPRINT in attrs


def test_read_csv_and_read_table(tmp_path: Path, spans: SpanList) -> None:
    csv, parquet = tmp_path / "a.csv", tmp_path / "b.parquet"
    frame = _frame(50)
    frame.loc[3, "x"] = np.nan
    frame.to_csv(csv, index=False)
    frame.to_parquet(parquet)
    pd.read_csv(csv)
    table = pq.read_table(parquet)
    assert table.num_rows == 50
    read_csv, read_table = spans.get()
    assert read_csv.name == "ingest.read_csv"
    assert read_table.name == "ingest.read_table"
    for span in (read_csv, read_table):
        assert span.attributes[semconv.DL_DATA_ROWS] == 50
        assert span.attributes[semconv.DL_QUALITY_NAN_FRACTION] == pytest.approx(1 / 150)


def test_schema_change_between_two_reads_of_one_source(tmp_path: Path, spans: SpanList) -> None:
    path = tmp_path / "feed.csv"
    _frame(20).to_csv(path, index=False)
    pd.read_csv(path)
    pd.read_csv(path)
    _frame(20).rename(columns={"x": "x_renamed"}).to_csv(path, index=False)
    pd.read_csv(path)
    frame = _frame(20)
    frame["y"] = frame["y"].astype(float)  # a dtype change
    frame.rename(columns={"x": "x_renamed"}).to_csv(path, index=False)
    pd.read_csv(path)
    first, same, renamed, retyped = spans.get("ingest.read_csv")
    assert semconv.DL_QUALITY_SCHEMA_MISMATCH not in first.attributes
    assert same.attributes[semconv.DL_QUALITY_SCHEMA_MISMATCH] is False
    assert renamed.attributes[semconv.DL_QUALITY_SCHEMA_MISMATCH] is True
    assert retyped.attributes[semconv.DL_QUALITY_SCHEMA_MISMATCH] is True
    assert first.attributes[semconv.DL_DATA_VERSION] != renamed.attributes[semconv.DL_DATA_VERSION]


def test_reference_configured_for_a_glob_of_sources(tmp_path: Path, spans: SpanList) -> None:
    reference = otel_dl.Reference.fit(_frame(2000, seed=1))
    otel_dl.watch(tmp_path / "day-*.parquet", reference=reference, owner="ranking")
    _frame(800, seed=2).to_parquet(tmp_path / "day-1.parquet")
    _frame(800, seed=3, shift=4.0).to_parquet(tmp_path / "day-2.parquet")
    pd.read_parquet(tmp_path / "day-1.parquet")
    pd.read_parquet(tmp_path / "day-2.parquet")
    good, drifted = spans.get()
    assert good.attributes["owner"] == "ranking"
    assert good.attributes[semconv.DL_DRIFT_STATUS] == "ok"
    assert good.attributes[semconv.DL_QUALITY_SCHEMA_MISMATCH] is False
    assert drifted.attributes[semconv.DL_DRIFT_STATUS] == "alert"
    assert drifted.attributes[semconv.DL_DRIFT_FEATURE] == "x"
    assert drifted.attributes[semconv.DL_QUALITY_OUT_OF_RANGE_FRACTION] > 0.1


def test_watched_name_and_version_replace_the_computed_ones(
    tmp_path: Path, spans: SpanList
) -> None:
    path = tmp_path / "train.parquet"
    _frame(10).to_parquet(path)
    otel_dl.watch(path, source="train-set", version="2026-11-23")
    pd.read_parquet(path)
    (span,) = spans.get()
    assert span.attributes[semconv.DL_DATA_SOURCE] == "train-set"
    assert span.attributes[semconv.DL_DATA_VERSION] == "2026-11-23"


def test_large_reads_compute_signals_on_a_bounded_sample(tmp_path: Path, spans: SpanList) -> None:
    path = tmp_path / "big.parquet"
    _frame(SIGNAL_ROWS * 5).to_parquet(path)
    pd.read_parquet(path)
    (span,) = spans.get()
    assert span.attributes[semconv.DL_DATA_ROWS] == SIGNAL_ROWS * 5
    assert semconv.DL_BATCH_SIZE not in span.attributes


def test_datasets_load_dataset_on_local_files(tmp_path: Path, spans: SpanList) -> None:
    import datasets

    path = tmp_path / "train.parquet"
    _frame(300).to_parquet(path)
    loaded = datasets.load_dataset(
        "parquet", data_files={"train": str(path)}, cache_dir=str(tmp_path / "cache")
    )
    (span,) = spans.get("ingest.load_dataset")
    assert span.attributes[semconv.DL_DATA_SOURCE] == str(path)
    assert span.attributes[semconv.DL_DATA_ROWS] == 300
    assert span.attributes[semconv.DL_DATA_VERSION] == f"train:{loaded['train']._fingerprint}"
    assert span.attributes[semconv.DL_QUALITY_NAN_FRACTION] == 0.0
    assert spans.get("ingest.read_table") == []  # reads inside load_dataset make no span


def test_missing_file_raises_unchanged(tmp_path: Path, spans: SpanList) -> None:
    with pytest.raises(FileNotFoundError):
        pd.read_csv(tmp_path / "absent.csv")
    (span,) = spans.get()
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"] == "FileNotFoundError"


def test_uninstrument_restores_the_readers(
    tmp_path: Path, handle: otel_dl.Instrumentation, spans: SpanList
) -> None:
    path = tmp_path / "x.csv"
    _frame(5).to_csv(path, index=False)
    handle.shutdown()
    pd.read_csv(path)
    assert spans.get() == []
    assert not hasattr(pd.read_csv, "__wrapped__")


# --- One failed extractor costs only its own attributes ------------------------------------


@pytest.mark.parametrize(
    ("extractor", "kept", "dropped"),
    [
        ("_file_attributes", semconv.DL_DATA_ROWS, semconv.DL_DATA_SOURCE),
        ("_sample", semconv.DL_DATA_SOURCE, semconv.DL_DATA_ROWS),
    ],
)
def test_failing_extractor_keeps_the_span(
    tmp_path: Path,
    spans: SpanList,
    monkeypatch: pytest.MonkeyPatch,
    extractor: str,
    kept: str,
    dropped: str,
) -> None:
    path = tmp_path / "day.parquet"
    _frame(50).to_parquet(path)
    expected = pd.read_parquet(path)
    spans.clear()
    monkeypatch.setattr(ingest_instrumentor, extractor, broken_extractor)
    errors = InternalErrors()
    pd.testing.assert_frame_equal(pd.read_parquet(path), expected)
    (span,) = spans.get("ingest.read_parquet")
    assert span.attributes[semconv.DL_STAGE] == "ingest"
    assert kept in span.attributes
    assert dropped not in span.attributes
    counted = errors.new()
    assert counted and all(site.startswith("ingest.read_parquet") for site in counted)
