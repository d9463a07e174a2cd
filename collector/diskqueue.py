"""Persistent, fsync'd, bounded on-disk logs: the inbox journal and the export queue.

Both are append-only segment files of records ``[u32 length][u32 crc32][payload]``.
An export queue write returns only after ``fsync``. A journal append returns once the
record is written to the operating system, which keeps it through a crash of the
collector (``kill -9`` included), and a background thread fsyncs what was written at
least every ``fsync_interval`` seconds, so an operating-system crash or a power loss
loses at most that much; with ``fsync_interval=0`` each append returns only after an
fsync that covers it, concurrent appends sharing their fsyncs (group commit, see
:meth:`_SegmentLog.sync`).

- :class:`Journal` keeps every received OTLP request until all its spans have been
  decided and handed on; segments are deleted once nothing in them is pending. At
  start, :meth:`Journal.replay` yields the requests of a previous run that were never
  handed on.
- :class:`ExportQueue` holds enriched OTLP requests until the backend has accepted
  them; a cursor file remembers the first unacknowledged record.

Both count their bytes against one shared :class:`DiskBudget`; when it is spent,
appends raise :class:`QueueFull` and the receivers answer with back-pressure::

    budget = DiskBudget(256 << 20)
    queue = ExportQueue(Path("q/export"), budget)
    queue.append(payload)
    position, payload = queue.peek()
    queue.ack(position)
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

_log = logging.getLogger("otel_dl.collector")
_HEADER = struct.Struct("<II")
# A journal segment is deleted once none of its spans is pending, so after a crash its
# spans already handed on are replayed (and forwarded twice): keep journal segments small.
_JOURNAL_SEGMENT_BYTES = 1024 * 1024
_EXPORT_SEGMENT_BYTES = 16 * 1024 * 1024
_MIN_SEGMENT_BYTES = 64 * 1024


class QueueFull(RuntimeError):
    """The disk budget is spent: the sender should retry later."""


class DiskBudget:
    """Bytes on disk shared by the journal and the export queue."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._lock = threading.Lock()

    def reserve(self, n: int, force: bool = False) -> None:
        with self._lock:
            if not force and self.used + n > self.max_bytes and self.used > 0:
                raise QueueFull(f"disk queue holds {self.used} of {self.max_bytes} bytes")
            self.used += n

    def release(self, n: int) -> None:
        with self._lock:
            self.used = max(0, self.used - n)

    @property
    def full(self) -> bool:
        return self.used >= self.max_bytes


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_records(path: Path) -> Iterator[tuple[int, bytes]]:
    """Yield ``(end offset, payload)``; stop at a torn or corrupt tail."""
    with path.open("rb") as fh:
        data = fh.read()
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start = offset + _HEADER.size
        payload = data[start : start + length]
        if len(payload) != length or zlib.crc32(payload) != crc:
            return
        offset = start + length
        yield offset, payload


class _SegmentLog:
    """Numbered segment files in one directory, appended under a lock."""

    def __init__(
        self, directory: Path, prefix: str, budget: DiskBudget, segment_bytes: int
    ) -> None:
        self.dir = directory
        self.prefix = prefix
        self.budget = budget
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.lock = threading.Lock()
        # A segment is deleted only once nothing in it is pending, so a segment is the
        # unit in which disk is given back: keep it a small part of the budget.
        self.segment_bytes = max(_MIN_SEGMENT_BYTES, min(segment_bytes, budget.max_bytes // 8))
        self.segments = sorted(self._seq(p) for p in self.dir.glob(f"{prefix}-*.log"))
        self.active = (self.segments[-1] + 1) if self.segments else 0
        self._fh: BinaryIO | None = None
        self._active_size = 0
        # Group commit (see sync): records written, and written and on disk, counted.
        self._written = 0
        self._synced = 0
        self._syncing = False
        self._sync = threading.Condition(threading.Lock())

    def _seq(self, path: Path) -> int:
        return int(path.stem.rsplit("-", 1)[1])

    def path(self, seq: int) -> Path:
        return self.dir / f"{self.prefix}-{seq:012d}.log"

    def write(self, payload: bytes, force: bool = False) -> int:
        """Append and fsync one record; return its segment. Call with ``lock`` held."""
        seq, _ = self.write_unsynced(payload, force)
        assert self._fh is not None
        os.fsync(self._fh.fileno())
        self._synced_to(self._written)
        return seq

    def write_unsynced(self, payload: bytes, force: bool = False) -> tuple[int, int]:
        """Append one record without waiting for the disk; return its segment and the
        ticket to pass to :meth:`sync`. Call with ``lock`` held."""
        record = _HEADER.pack(len(payload), zlib.crc32(payload)) + payload
        self.budget.reserve(len(record), force)
        if self._fh is None or self._active_size >= self.segment_bytes:
            self._rotate()
        assert self._fh is not None
        self._fh.write(record)
        self._fh.flush()
        self._active_size += len(record)
        self._written += 1
        return self.active, self._written

    def sync(self, ticket: int) -> None:
        """Return once the record of ``ticket`` is on disk. Call without ``lock`` held.

        Group commit: one caller at a time fsyncs everything written so far, while the
        others wait for it; a caller whose record that fsync covered returns without
        one of its own. Under concurrent appends one fsync serves many of them, and no
        caller waits for more than the fsync in progress and then its own.
        """
        with self._sync:
            while self._synced < ticket:
                if not self._syncing:
                    self._syncing = True
                    break
                self._sync.wait()
            else:
                return
        target, done = 0, False
        try:
            with self.lock:
                target = self._written
                # A duplicate, so a rotation meanwhile cannot close it under the fsync.
                fd = os.dup(self._fh.fileno()) if self._fh is not None else -1
            if fd >= 0:
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            done = True
        finally:
            with self._sync:
                self._syncing = False
                if done:
                    self._synced = max(self._synced, target)
                self._sync.notify_all()

    def sync_written(self) -> None:
        """Return once everything written so far is on disk (nothing to do when it is)."""
        ticket = self._written
        if self._synced < ticket:
            self.sync(ticket)

    def _synced_to(self, ticket: int) -> None:
        with self._sync:
            self._synced = max(self._synced, ticket)
            self._sync.notify_all()

    def _rotate(self) -> None:
        if self._fh is not None:
            # Everything written so far is in this file: make it durable before closing.
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._synced_to(self._written)
            self.active += 1
        # Segments hold whole requests, attribute values included: owner only.
        fd = os.open(self.path(self.active), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._fh = os.fdopen(fd, "ab")
        self._active_size = 0
        self.segments.append(self.active)
        _fsync_dir(self.dir)

    def delete(self, seq: int) -> None:
        path = self.path(seq)
        if seq == self.active and self._fh is not None:
            self._fh.close()
            self._fh = None
            self.active += 1
        try:
            self.budget.release(path.stat().st_size)
            path.unlink()
        except FileNotFoundError:
            pass
        if seq in self.segments:
            self.segments.remove(seq)

    def close(self) -> None:
        with self.lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


class Journal:
    """Received requests kept on disk until every span in them has been handed on.

    ``fsync_interval`` (seconds): 0 fsyncs each append before it returns; above 0, an
    append returns once written to the operating system and a thread of the journal's
    own fsyncs at least that often (see the module docstring)."""

    def __init__(self, directory: Path, budget: DiskBudget, fsync_interval: float = 0.0) -> None:
        self._log = _SegmentLog(directory, "inbox", budget, _JOURNAL_SEGMENT_BYTES)
        self._old = list(self._log.segments)
        for seq in self._old:
            budget.used += self._log.path(seq).stat().st_size
        self._pending: dict[int, int] = {}
        self._interval = fsync_interval
        self._closed = threading.Event()
        self._syncer: threading.Thread | None = None  # started by the first append

    def replay(self) -> Iterator[bytes]:
        """Yield the requests a previous run left undecided (call once, before receiving)."""
        for seq in self._old:
            for _, payload in _read_records(self._log.path(seq)):
                yield payload

    def drop_replayed(self) -> None:
        """Delete the previous run's segments once their requests are journaled again."""
        self._log.sync_written()  # the copies are on disk before the originals go
        with self._log.lock:
            for seq in self._old:
                self._log.delete(seq)
        self._old = []

    def append(self, payload: bytes, spans: int, force: bool = False) -> int:
        """Journal one request holding ``spans`` spans; return its segment number.

        ``force`` skips the budget check, for requests replayed from a previous run.
        """
        with self._log.lock:
            seq, ticket = self._log.write_unsynced(payload, force)
            self._pending[seq] = self._pending.get(seq, 0) + spans
            if self._interval > 0 and self._syncer is None and not self._closed.is_set():
                self._syncer = threading.Thread(
                    target=self._sync_loop, name="otel-dl-journal-sync", daemon=True
                )
                self._syncer.start()
        if self._interval > 0:
            return seq  # the sync thread makes it durable against an OS crash
        try:
            self._log.sync(ticket)
        except OSError:
            # Not acknowledged: the sender sends it again, so it holds nothing here.
            self.release({seq: spans})
            raise
        return seq

    def _sync_loop(self) -> None:
        while not self._closed.wait(self._interval):
            try:
                self._log.sync_written()
            except OSError as exc:
                _log.error("inbox journal fsync failed, retried in %s s: %s", self._interval, exc)

    def release(self, counts: dict[int, int]) -> None:
        """Mark spans handed on; delete the segments with nothing pending."""
        with self._log.lock:
            for seq, n in counts.items():
                left = self._pending.get(seq, 0) - n
                if left > 0:
                    self._pending[seq] = left
                    continue
                self._pending.pop(seq, None)
                self._log.delete(seq)

    def close(self) -> None:
        self._closed.set()
        if self._syncer is not None:
            self._syncer.join()
            self._log.sync_written()
        self._log.close()


class ExportQueue:
    """Enriched requests waiting for the backend, in order, with a persisted read cursor."""

    def __init__(self, directory: Path, budget: DiskBudget) -> None:
        self._log = _SegmentLog(directory, "export", budget, _EXPORT_SEGMENT_BYTES)
        self._cursor_path = directory / "cursor"
        self._cond = threading.Condition(self._log.lock)
        seq, offset = 0, 0
        if self._cursor_path.exists():
            raw = self._cursor_path.read_text().split()
            if len(raw) == 2:
                seq, offset = int(raw[0]), int(raw[1])
        for old in list(self._log.segments):
            if old < seq:
                self._log.delete(old)
        # Once drained, every segment is deleted; new ones must still sort after the
        # cursor, or the reader would skip them.
        self._log.active = max(self._log.active, seq + 1)
        self._pos = (seq, offset)
        self._buffer: list[tuple[tuple[int, int], bytes]] = []
        self.length = 0
        for s in self._log.segments:
            size = self._log.path(s).stat().st_size
            budget.used += size
            for end, _ in _read_records(self._log.path(s)):
                if (s, end) > self._pos:
                    self.length += 1

    def append(self, payload: bytes, force: bool = False) -> None:
        """Persist one request for export; raise :class:`QueueFull` when the budget is spent.

        ``force`` skips the budget check, for spans that already count against it in the
        journal (refusing them would keep the journal from ever being released).
        """
        with self._cond:
            self._log.write(payload, force)
            self.length += 1
            self._cond.notify_all()

    def peek(self, timeout: float) -> tuple[tuple[int, int], bytes] | None:
        """The oldest unacknowledged ``(position, payload)``, waiting up to ``timeout``."""
        with self._cond:
            if self.length == 0:
                self._cond.wait(timeout)
            if self.length == 0:
                return None
            if not self._buffer:
                self._load()
            return self._buffer[0] if self._buffer else None

    def _load(self) -> None:
        seq, offset = self._pos
        for s in self._log.segments:
            if s < seq:
                continue
            for end, payload in _read_records(self._log.path(s)):
                if s == seq and end <= offset:
                    continue
                self._buffer.append(((s, end), payload))
                if len(self._buffer) >= 64:
                    return

    def ack(self, position: tuple[int, int]) -> None:
        """Mark everything up to ``position`` exported; persist the cursor."""
        with self._cond:
            if self._buffer and self._buffer[0][0] == position:
                self._buffer.pop(0)
            self.length -= 1
            self._pos = position
            tmp = self._cursor_path.with_suffix(".tmp")
            with tmp.open("w") as fh:
                fh.write(f"{position[0]} {position[1]}")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self._cursor_path)
            for s in list(self._log.segments):
                if s < position[0] or self.length == 0:
                    self._log.delete(s)

    def close(self) -> None:
        with self._cond:
            self._cond.notify_all()
        self._log.close()
