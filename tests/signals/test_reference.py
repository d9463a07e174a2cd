"""Reference fitting, the JSON file format, and the errors for unusable files."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from otel_dl import drift
from otel_dl.reference import FORMAT_VERSION, Reference, ReferenceFileError
from otel_dl.table import to_table


@pytest.fixture
def frame():
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "x": rng.standard_normal(300),
            "n": rng.integers(0, 5, 300),
            "city": rng.choice(["rome", "oslo", None], 300),
        }
    )


def test_roundtrip_keeps_every_score(tmp_path, frame):
    ref = Reference.fit(frame, bins=7)
    path = tmp_path / "ref.json"
    ref.save(path)
    loaded = Reference.load(path)
    assert loaded.schema_fingerprint == ref.schema_fingerprint
    assert loaded.names == ref.names and loaded.bins == 7
    current = frame.sample(frac=0.5, random_state=1)
    for method in drift.METHODS:
        assert drift.score(loaded, current, method=method) == drift.score(ref, current, method)
    document = json.loads(path.read_text())
    assert document["version"] == FORMAT_VERSION
    assert {f["kind"] for f in document["features"]} == {"numeric", "categorical"}


def test_inputs_of_every_kind_give_the_same_profile():
    rng = np.random.default_rng(1)
    data = rng.standard_normal((200, 3)).astype(np.float32)
    expected = Reference.fit(data).numeric.shares
    for variant in (torch.from_numpy(data), {str(i): data[:, i] for i in range(3)}):
        np.testing.assert_array_equal(Reference.fit(variant).numeric.shares, expected)


def test_feature_names_apply_to_arrays(tmp_path):
    data = np.arange(20.0).reshape(10, 2)
    ref = Reference.fit(data, feature_names=["a", "b"])
    ref.save(tmp_path / "r.json")
    loaded = Reference.load(tmp_path / "r.json")
    assert set(drift.score(loaded, data)) == {"a", "b"}
    with pytest.raises(ValueError, match="feature_names"):
        Reference.fit({"a": data[:, 0]}, feature_names=["z"])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "\x00\x01garbage", "not valid JSON"),
        (lambda text: text.replace('"version": 1', '"version": 99'), "version 99"),
        (lambda text: text.replace('"otel-dl-reference"', '"other"'), "not an otel-dl"),
        (lambda text: text.replace('"edges"', '"edgez"'), "missing field"),
        (lambda text: "[1, 2]", "not an otel-dl"),
    ],
)
def test_unusable_files_name_the_file_and_problem(tmp_path, frame, mutate, message):
    path = tmp_path / "ref.json"
    Reference.fit(frame).save(path)
    path.write_text(mutate(path.read_text()))
    with pytest.raises(ReferenceFileError, match=message) as caught:
        Reference.load(path)
    assert str(path) in str(caught.value)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(ReferenceFileError, match="cannot read"):
        Reference.load(tmp_path / "absent.json")
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ReferenceFileError, match=r"bin\.json"):
        Reference.load(tmp_path / "bin.json")


def test_flattening_rules():
    assert to_table(np.float64(3.0)).numeric.shape == (1, 1)
    assert to_table(np.arange(5)).numeric.shape == (5, 1)
    table = to_table(np.zeros((4, 2, 3)))
    assert table.numeric.shape == (4, 6) and table.names[-1] == "5"
    assert to_table({"v": np.zeros((3, 2))}).names == ("v.0", "v.1")
    assert (
        to_table(np.zeros((4, 2, 3))).schema_fingerprint
        != to_table(np.zeros((4, 6))).schema_fingerprint
    )
