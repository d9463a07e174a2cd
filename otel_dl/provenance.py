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
or otherwise (sklearn) the object's content as pickling reduces it, walked in a fixed
order (:class:`_ContentDigest`): a model trained in the process and the same model loaded
from its file, in any process, get one fingerprint. Settings that change how a model
runs, not what it predicts (``n_jobs``, ``verbose``, ...: :data:`RUNTIME_PARAMS`), are
left out, and an XGBoost or LightGBM booster goes in as its trees and the few settings
its predictions read (:func:`_booster_content`), not its serialised configuration, so
the model loaded with ``load_model`` gets the trained one's fingerprint. Bytes hash as
the file holding them would, so an ONNX Runtime session made from bytes and one made
from the file agree. The result is cached per object: weights changed in place keep the
first fingerprint until :func:`model_fingerprint` is asked to ``refresh`` or
:func:`forget_model` drops it (the instrumentors do after ``load_state_dict``, and after
a scikit-learn estimator's ``fit`` or ``load_model``).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
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
        digest = hashlib.blake2b(digest_size=16)
        _ContentDigest(digest).add(model)
        return digest.hexdigest()
    except Exception:
        return None


#: Estimator parameters that change how a model runs, not what it predicts: left out of
#: the fingerprint, so replicas run with other thread counts or log levels agree.
RUNTIME_PARAMS = frozenset({"n_jobs", "nthread", "n_threads", "verbose", "verbosity", "silent"})


def _booster_content(obj: Any) -> bytes | None:
    """What an XGBoost or LightGBM booster predicts with, as bytes; None for any other
    object. XGBoost: its JSON model's trees, base score, objective and attributes (the
    best iteration), without the scikit-learn parameters it may carry. LightGBM: its
    model text up to the ``parameters:`` section (threads, seeds, paths). Their pickled
    state holds the training configuration too, which a model loaded from its file
    lacks or has otherwise."""
    module = _booster_library(obj)
    if module == "xgboost":
        learner = json.loads(bytes(obj.save_raw("json")))["learner"]
        attributes = dict(learner.get("attributes", {}))
        attributes.pop("scikit_learn", None)
        learner["attributes"] = attributes
        return json.dumps(learner, sort_keys=True).encode()
    if module == "lightgbm":
        return str(obj.model_to_string()).split("\nparameters:\n", 1)[0].encode()
    return None


# Values whose repr() is their content: a list or dict of them goes in as one repr.
_PLAIN = frozenset(
    {str, int, float, bool, type(None), np.int64, np.int32, np.float64, np.float32, np.bool_}
)


def _fitted_state(estimator: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A scikit-learn-style estimator's pickled ``state``, by attribute name, without its
    runtime parameters (:data:`RUNTIME_PARAMS`), and without any constructor parameter
    when the state holds a booster: the booster is the model then, and a model loaded
    with ``load_model`` has other (or no) parameters for the same trees."""
    drop: set[str] = set(RUNTIME_PARAMS)
    if any(_booster_library(value) for value in state.values()):
        with contextlib.suppress(Exception):
            drop.update(estimator.get_params(deep=False))
        drop.add("_other_params")  # LightGBM's: parameters set beyond its signature
    # By name: the order attributes were set in (fit, or load_model) is no content.
    return {k: state[k] for k in sorted(state, key=str) if k not in drop}


def _booster_library(obj: Any) -> str | None:
    """``"xgboost"`` or ``"lightgbm"`` for a booster of theirs, else None."""
    klass = type(obj)
    if klass.__name__ != "Booster":
        return None
    module = klass.__module__.partition(".")[0]
    return module if module in ("xgboost", "lightgbm") else None


class _ContentDigest:
    """Feeds a digest with an object's content, as pickling sees it (``__reduce_ex__``),
    walked in a fixed order: arrays by dtype, shape and bytes (a structured array field by
    field, never its padding), dicts in their order, sets sorted, classes and functions by
    name. Each
    container, array or object goes in as the digest of its own content, computed once,
    so it makes no difference whether equal parts are one shared object or copies.
    Pickle's own bytes are no fingerprint: they depend on that sharing (a model trained
    here and the same model loaded from its file differ), and a structured array's
    padding bytes (a tree's nodes) are whatever the memory held: a RandomForest loaded
    from one file pickled differently in every process."""

    MAX_OBJECTS = 1_000_000  # past that, the rest of a huge object graph is left out

    def __init__(self, digest: Any) -> None:
        self.update = digest.update
        self.memo: dict[int, bytes] = {}  # id -> digest of that object's content
        self.walking: set[int] = set()  # ids on the path being walked (cycles)
        self.kept: list[Any] = []  # what reduce made: alive, so their ids stay theirs

    def add(self, obj: Any) -> None:
        update = self.update
        if obj is None or isinstance(obj, bool | int | float | complex):
            update(f"{type(obj).__name__}:{obj!r};".encode())
            return
        if isinstance(obj, str):
            data = obj.encode("utf-8", "surrogatepass")
            update(b"s%d:" % len(data) + data)
            return
        if isinstance(obj, bytes | bytearray):
            update(b"b%d:" % len(obj) + bytes(obj))
            return
        if isinstance(obj, type) or (callable(obj) and hasattr(obj, "__qualname__")):
            name = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}"
            update(f"g:{name};".encode())
            return
        key = id(obj)
        known = self.memo.get(key)
        if known is not None:
            update(known)
            return
        if key in self.walking:
            update(b"cycle;")
            return
        if len(self.memo) >= self.MAX_OBJECTS:
            update(b"...;")
            return
        self.walking.add(key)
        self.kept.append(obj)
        part = hashlib.blake2b(digest_size=16)
        self.update = part.update
        try:
            self._content(obj)
        finally:
            self.update = update
            self.walking.discard(key)
        self.memo[key] = known = part.digest()
        update(known)

    def _content(self, obj: Any) -> None:
        update = self.update
        if isinstance(obj, np.ndarray | np.generic):
            self._array(np.asarray(obj))
        elif isinstance(obj, list | tuple):
            update(b"l%d:" % len(obj) if isinstance(obj, list) else b"t%d:" % len(obj))
            if all(type(item) in _PLAIN for item in obj):  # at once: a vocabulary's words
                update(repr(obj).encode("utf-8", "surrogatepass"))
                return
            for item in obj:
                self.add(item)
        elif isinstance(obj, dict):
            # In insertion order, which pickling keeps (a set's order it does not).
            update(b"d%d:" % len(obj))
            if all(type(k) in _PLAIN and type(v) in _PLAIN for k, v in obj.items()):
                update(repr(obj).encode("utf-8", "surrogatepass"))
                return
            for k, v in obj.items():
                self.add(k)
                self.add(v)
        elif isinstance(obj, set | frozenset):
            update(b"e%d:" % len(obj))
            for item in sorted(obj, key=repr):
                self.add(item)
        else:
            self._reduced(obj)

    def _array(self, array: np.ndarray) -> None:
        self.update(f"a:{array.dtype.str}:{array.shape};".encode())
        if array.dtype.names:  # a record array: each field, never the padding between
            for name in array.dtype.names:
                self.update(f"f:{name};".encode())
                self._array(array[name])
        elif array.dtype.hasobject:
            for item in array.reshape(-1).tolist():
                self.add(item)
        else:
            self.update(_sampled(_array_bytes(array), MODEL_SAMPLE_BYTES))

    def _reduced(self, obj: Any) -> None:
        update = self.update
        klass = type(obj)
        update(f"o:{klass.__module__}.{klass.__qualname__};".encode())
        booster = _booster_content(obj)
        if booster is not None:
            update(b"booster:" + booster)
            return
        try:
            reduced = obj.__reduce_ex__(4)
        except Exception:
            return  # a lock, a file: its class is all there is to say
        if isinstance(reduced, str):
            update(f"g:{reduced};".encode())
            return
        self.kept.append(reduced)
        function, args, *rest = (*reduced, None, None, None)[:5]
        self.add(function)
        self.add(args)
        state, items, pairs = rest[0], rest[1], rest[2]
        if isinstance(state, dict) and hasattr(obj, "get_params"):
            state = _fitted_state(obj, state)
            self.kept.append(state)
        self.add(state)
        if items is not None:
            self.add(list(items))
        if pairs is not None:
            self.add(dict(pairs))


def _forget(key: int, _ref: object) -> None:
    _model_cache.pop(key, None)


def forget_model(model: Any) -> None:
    """Drop ``model``'s cached fingerprint: its next one is computed anew (its weights
    changed in place: a refit, a ``load_model``)."""
    with _lock:
        cached = _model_cache.get(id(model))
        if cached is not None and cached[0]() is model:
            del _model_cache[id(model)]


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
