"""The mirror sink: redacted inference records in rotating JSONL files, for offline evaluation.

One JSON object per line: model, version, protocol, service, pod, status, latency, sizes, and
per input and output tensor its name, shape and wire datatype. With `values: true` the values
of numeric tensors are written too (as nested lists, non-finite numbers as null), but never
those of BYTES tensors, never parameters, texts, request ids or error messages: those are
where PII travels. Tensors above `max_value_elements` are written without values.

Files are `infertap-mirror-<seq>.jsonl` in the sink's directory, each at most `max_bytes`
(a single larger record gets a file to itself), at most `max_files` of them (the oldest are
deleted). Safe across restarts: a new agent starts a new file after the highest sequence it
finds, so it never appends after a line a crash may have cut short, and it prunes to
`max_files` at once. Readers should skip a last line that does not parse.

`offer()` runs on the reader thread: it only queues (bounded; a full queue drops and counts).
One writer thread serializes and writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from infertap.agent.mirror.spec import SinkSpec
from infertap.agent.models.inference_event import InferenceEvent

log = logging.getLogger(__name__)

FILE_PREFIX: Final = "infertap-mirror-"
FILE_SUFFIX: Final = ".jsonl"
_FILE_RE: Final = re.compile(re.escape(FILE_PREFIX) + r"(\d+)" + re.escape(FILE_SUFFIX))
_QUEUE: Final = 4096


def _values(datatype: str, array: npt.NDArray[Any], limit: int) -> list[Any] | None:
    """Plain numbers of a numeric tensor, or None when it must not (or need not) be written."""
    numeric = array.dtype.kind in ("b", "i", "u", "f") or array.dtype.name == "bfloat16"
    if datatype == "BYTES" or not numeric or array.size > limit:
        return None
    if array.dtype.kind == "b":
        return list(np.asarray(array, dtype=bool).tolist()) if array.ndim else [bool(array)]
    if array.dtype.kind in "iu":
        out: Any = np.asarray(array).tolist()
    else:  # floats, including FP16/BF16: as float64, non-finite as null
        x = np.asarray(array, dtype=np.float64)
        if np.isfinite(x).all():
            out = x.tolist()
        else:
            obj = x.astype(object)
            obj[~np.isfinite(x)] = None
            out = obj.tolist()
    return out if isinstance(out, list) else [out]


def record_of(event: InferenceEvent, pod: str, spec: SinkSpec) -> dict[str, Any]:
    """The redacted record of one call (see the module doc for what is left out and why)."""

    def tensors(arrays: dict[str, npt.NDArray[Any]], types: dict[str, str]) -> list[Any]:
        out = []
        for name, arr in arrays.items():
            datatype = types.get(name, str(arr.dtype))
            entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
            if spec.values:
                vals = _values(datatype, arr, spec.max_value_elements)
                if vals is not None:
                    entry["values"] = vals
            out.append(entry)
        return out

    return {
        "time": round(time.time(), 6),
        "ts_ns": event.ts_ns,
        "model": event.model,
        "version": event.version,
        "protocol": event.protocol,
        "service": str(event.service),
        "pod": pod,
        "status": event.status,
        "latency_ms": event.latency_ns / 1e6 if event.latency_ns is not None else None,
        "payload_bytes": event.payload_bytes,
        "request_truncated": event.request_truncated,
        "response_truncated": event.response_truncated,
        "inputs": tensors(event.inputs, event.input_datatypes),
        "outputs": tensors(event.outputs, event.output_datatypes),
    }


class RotatingFiles:
    """Size- and count-bounded numbered files in one directory. Not thread-safe: one writer."""

    def __init__(self, directory: Path, max_bytes: int, max_files: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.max_files = max_files
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        existing = self.files()
        self._seq = (_seq_of(existing[-1]) if existing else 0) + 1
        self._fd: int | None = None
        self._size = 0
        self._prune(keep=max_files - 1)  # room for the file this run is about to start

    def files(self) -> list[Path]:
        """Our files, oldest first."""
        found = [p for p in self.directory.iterdir() if _FILE_RE.fullmatch(p.name)]
        return sorted(found, key=_seq_of)

    def _path(self, seq: int) -> Path:
        return self.directory / f"{FILE_PREFIX}{seq:08d}{FILE_SUFFIX}"

    def _prune(self, keep: int) -> None:
        files = self.files()
        for old in files[: max(0, len(files) - keep)]:
            with contextlib.suppress(FileNotFoundError):  # another agent pruned it first
                old.unlink()

    def write(self, line: bytes) -> None:
        if self._fd is not None and self._size > 0 and self._size + len(line) > self.max_bytes:
            self._close()
            self._seq += 1
        if self._fd is None:
            self._prune(keep=self.max_files - 1)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
            self._fd = os.open(self._path(self._seq), flags, 0o600)
            self._size = 0
        view = memoryview(line)
        while view:  # one record per write normally; a short write continues, never re-writes
            n = os.write(self._fd, view)
            view = view[n:]
        self._size += len(line)

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        self._close()


def _seq_of(p: Path) -> int:
    m = _FILE_RE.fullmatch(p.name)
    return int(m.group(1)) if m else 0


class MirrorSink:
    """Queue on the reader thread, write on one thread of its own."""

    def __init__(self, spec: SinkSpec) -> None:
        self.spec = spec
        self.files = RotatingFiles(Path(spec.directory), spec.max_bytes, spec.max_files)
        self._queue: queue.Queue[tuple[InferenceEvent, str] | None] = queue.Queue(_QUEUE)
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0  # queue full
        self.failed = 0  # records that could not be serialized or written

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mirror-sink", daemon=True)
            self._thread.start()

    def offer(self, event: InferenceEvent, pod: str) -> bool:
        try:
            self._queue.put_nowait((event, pod))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # the writer is stuck: join times out
                self._queue.put(None, timeout=timeout)
            self._thread.join(timeout=timeout)
            self._thread = None
        self.files.close()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            finally:
                self._queue.task_done()

    def _write(self, event: InferenceEvent, pod: str) -> None:
        try:
            line = json.dumps(
                record_of(event, pod, self.spec), separators=(",", ":"), allow_nan=False
            )
            self.files.write(line.encode() + b"\n")
            self.written += 1
        except (OSError, ValueError, TypeError) as exc:
            self.failed += 1
            if self.failed == 1 or self.failed % 1000 == 0:  # no flood when the disk is full
                log.warning(
                    "mirror sink: %d record(s) not written (%s)", self.failed, type(exc).__name__
                )
