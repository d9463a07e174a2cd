"""Provenance: which data, which model, which code produced a span.

::

    provenance.data_fingerprint(batch)     # blake2b of a bounded, deterministic byte sample
    provenance.model_fingerprint(model)    # once per model object, then cached
    provenance.code_version()              # OTEL_DL_CODE_VERSION, else the git commit

Data fingerprints hash the schema fingerprint, the row count and a sample of the batch's
numeric bytes: all of them up to :data:`DATA_SAMPLE_BYTES`, above that
:data:`SAMPLE_CHUNKS` chunks at a fixed stride (the first and last bytes included) adding
up to :data:`DATA_SAMPLE_BYTES`, plus up to :data:`SAMPLE_CHUNKS` evenly spaced values of each
categorical column. So the cost is bounded whatever the batch size; two batches that
differ only in unsampled bytes share a fingerprint.

Model fingerprints hash the weights (names, dtypes, shapes and bytes of each tensor in
``state_dict()``, each tensor sampled the same way above :data:`MODEL_SAMPLE_BYTES`), the
model file for a path or an ONNX Runtime session (sampled above :data:`FILE_SAMPLE_BYTES`),
or the pickled object otherwise (sklearn). Bytes hash as the file holding them would, so
an ONNX Runtime session made from bytes and one made from the file agree. The result is
cached per object, so weights changed in place after the first call keep the first
fingerprint.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import subprocess
import threading
import weakref
from functools import lru_cache, partial
from typing import Any

import numpy as np

from otel_dl.table import Table, to_table

DATA_SAMPLE_BYTES = 2048
MODEL_SAMPLE_BYTES = 1 << 20
FILE_SAMPLE_BYTES = 64 << 20
SAMPLE_CHUNKS = 64
CODE_VERSION_ENV = "OTEL_DL_CODE_VERSION"


def _sampled(buffer: np.ndarray, budget: int) -> bytes:
    """All bytes of a uint8 buffer up to ``budget``, else :data:`SAMPLE_CHUNKS` chunks at
    a fixed stride from the start plus the last chunk, read through one strided view."""
    if buffer.size <= budget:
        return buffer.tobytes()
    chunk = budget // SAMPLE_CHUNKS
    stride = (buffer.size - chunk) // (SAMPLE_CHUNKS - 1)
    head = buffer[: stride * (SAMPLE_CHUNKS - 1)].reshape(SAMPLE_CHUNKS - 1, stride)
    return head[:, :chunk].tobytes() + buffer[buffer.size - chunk :].tobytes()


def _array_bytes(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def data_fingerprint(data: Any) -> str | None:
    """Fingerprint of a batch; None when it has no tabular reading."""
    try:
        table = data if isinstance(data, Table) else to_table(data)
    except (TypeError, ValueError):
        return None
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{table.schema_fingerprint}:{table.rows}:".encode())
    digest.update(_sampled(_array_bytes(table.numeric), DATA_SAMPLE_BYTES))
    for name, values in table.categorical.items():
        step = max(1, len(values) // SAMPLE_CHUNKS)
        digest.update(repr((name, values[::step][:SAMPLE_CHUNKS].tolist())).encode())
    return digest.hexdigest()


def data_fingerprints(schema_fingerprint: str, values: np.ndarray, starts: Any) -> list[str]:
    """:func:`data_fingerprint` of several numeric batches of one schema at once:
    ``values`` stacks their rows, batch ``i`` being rows ``starts[i]`` up to the next."""
    raw = _array_bytes(values)  # C order: batch i's bytes are one slice of it
    width = raw.size // len(values) if len(values) else 0
    out = []
    for start, end in itertools.pairwise([*starts, len(values)]):
        head = f"{schema_fingerprint}:{end - start}:".encode()
        body = _sampled(raw[start * width : end * width], DATA_SAMPLE_BYTES)
        out.append(hashlib.blake2b(head + body, digest_size=16).hexdigest())
    return out


# --- Models --------------------------------------------------------------------------------

_model_cache: dict[int, tuple[weakref.ref[Any], str | None]] = {}
_file_cache: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def file_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """blake2b of a file (sampled above FILE_SAMPLE_BYTES); None if it cannot be read."""
    try:
        where = os.fspath(path)
        stat = os.stat(where)
        key = (os.path.abspath(where), stat.st_size, stat.st_mtime_ns)
        if key in _file_cache:
            return _file_cache[key]
        digest = hashlib.blake2b(digest_size=16)
        digest.update(str(stat.st_size).encode())
        with open(where, "rb") as handle:
            if stat.st_size <= FILE_SAMPLE_BYTES:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            else:
                chunk = FILE_SAMPLE_BYTES // SAMPLE_CHUNKS
                for k in range(SAMPLE_CHUNKS):
                    handle.seek(k * (stat.st_size - chunk) // (SAMPLE_CHUNKS - 1))
                    digest.update(handle.read(chunk))
    except OSError:
        return None
    _file_cache[key] = digest.hexdigest()
    return _file_cache[key]


def bytes_fingerprint(data: bytes | bytearray | memoryview) -> str:
    """The :func:`file_fingerprint` of a file holding ``data``: a model loaded from bytes
    gets the same fingerprint as the same model loaded from its file."""
    view = memoryview(data).cast("B")
    size = len(view)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(size).encode())
    if size <= FILE_SAMPLE_BYTES:
        digest.update(view)
    else:
        chunk = FILE_SAMPLE_BYTES // SAMPLE_CHUNKS
        for k in range(SAMPLE_CHUNKS):
            start = k * (size - chunk) // (SAMPLE_CHUNKS - 1)
            digest.update(view[start : start + chunk])
    return digest.hexdigest()


def _compute_model_fingerprint(model: Any) -> str | None:
    if isinstance(model, (str, os.PathLike)):
        return file_fingerprint(model)
    if isinstance(model, (bytes, bytearray, memoryview)):
        return bytes_fingerprint(model)
    path = getattr(model, "_model_path", None)  # onnxruntime.InferenceSession
    if isinstance(path, str) and path:
        return file_fingerprint(path)
    state_dict = getattr(model, "state_dict", None)
    if callable(state_dict):
        import torch

        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in state_dict().items():
            if not hasattr(tensor, "detach"):
                digest.update(repr((name, tensor)).encode())
                continue
            t = tensor.detach()
            if t.device.type == "meta":  # no values to read: its name, dtype and shape
                digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:meta".encode())
                continue
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
            if t.layout != torch.strided:  # sparse: its indices and values
                coo = t.to_sparse_coo().coalesce().cpu()
                parts = [coo.indices(), coo.values()]
            else:
                parts = [t.cpu()]
            for part in parts:
                raw = part.contiguous().reshape(-1).view(torch.uint8).numpy()
                digest.update(_sampled(raw, MODEL_SAMPLE_BYTES))
        return digest.hexdigest()
    try:
        return hashlib.blake2b(pickle.dumps(model), digest_size=16).hexdigest()
    except Exception:
        return None


def _forget(key: int, _ref: object) -> None:
    _model_cache.pop(key, None)


def model_fingerprint(model: Any, *, refresh: bool = False) -> str | None:
    """Fingerprint of a model object, path or bytes, computed once per object.

    ``refresh=True`` recomputes it, for weights changed in place (``load_state_dict``).
    """
    if isinstance(model, (str, os.PathLike, bytes, bytearray, memoryview)):
        return _compute_model_fingerprint(model)
    key = id(model)
    with _lock:
        cached = _model_cache.get(key)
        if not refresh and cached is not None and cached[0]() is model:
            return cached[1]
    value = _compute_model_fingerprint(model)
    try:
        # The entry goes when the model does, so a new object reusing the id is not served
        # the old fingerprint.
        ref = weakref.ref(model, partial(_forget, key))
    except TypeError:
        return value
    with _lock:
        _model_cache[key] = (ref, value)
    return value


@lru_cache(maxsize=1)
def _git_commit() -> str | None:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def code_version(configured: str | None = None) -> str | None:
    """``configured`` (Config.code_version), else OTEL_DL_CODE_VERSION, else the git commit
    of the working directory (looked up once), else None."""
    return configured or os.environ.get(CODE_VERSION_ENV) or _git_commit()
