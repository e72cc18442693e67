"""Serialization of Python values into a flat payload plus metadata, read back without copying.

* ``numpy.ndarray`` (non-object dtypes) -> Arrow IPC tensor message.
* ``pyarrow`` ``Table`` / ``RecordBatch`` / ``Array`` / ``ChunkedArray`` -> Arrow IPC stream.
* ``torch.Tensor`` (CPU, when torch is importable) -> Arrow IPC tensor of its numpy view.
* Anything else -> cloudpickle, pickle protocol 5, with out-of-band buffers: large buffers nested
  in arbitrary objects (numpy arrays in dicts, bytes-like PickleBuffers) are laid out in the payload
  beside the pickle stream and handed back as views on load, not copied.

Every buffer in a payload starts at a 64-byte aligned offset, so when the payload lives in a
page-aligned shared-memory mapping, arrays read back are aligned, read-only views into it.

Public API (the runtime imports these)::

    ser = serialize(value)          # SerializedObject: .meta (dict), .nbytes, .inlineable
    ser.write_into(dest)            # fill a writable buffer of exactly ser.nbytes (one copy)
    ser.write_to_file(path)         # or write it to a file with write(2) (the store's plain path)
    ser.pieces                      # None, or [(offset, buffer)]: the payload as source views, so
                                    # the store copies and hashes it block by block
    payload = ser.to_bytes()        # the payload as bytes (for small values)
    value = deserialize(ser.meta, payload)           # payload: bytes / memoryview / mmap slice
    blob = serialize_inline(value); deserialize_inline(blob)   # self-describing small form

``INLINE_THRESHOLD`` (64 KiB): values whose payload is at most this size are meant to ride inline
in task messages instead of going through the store.
"""

from __future__ import annotations

import pickle
import struct
import sys
from collections.abc import Callable
from typing import Any

import cloudpickle
import numpy as np
import pyarrow as pa

from . import dagcbor
from .errors import CodecError, SerializationError

__all__ = [
    "ALIGNMENT",
    "INLINE_THRESHOLD",
    "SerializedObject",
    "deserialize",
    "deserialize_inline",
    "serialize",
    "serialize_inline",
]

INLINE_THRESHOLD = 64 * 1024
ALIGNMENT = 64
_COPY_THREADS = 2  # Arrow's parallel memcpy for large writes


def _align(offset: int) -> int:
    return (offset + ALIGNMENT - 1) & ~(ALIGNMENT - 1)


def _writable_arrow_buffer(dest: Any) -> pa.Buffer:
    buffer = pa.py_buffer(dest)
    if not buffer.is_mutable:
        raise SerializationError("destination buffer is read-only")
    return buffer


class SerializedObject:
    """A value ready to be written: metadata plus a writer that fills ``nbytes`` bytes."""

    __slots__ = ("_writer", "meta", "nbytes", "pieces", "segments")

    def __init__(
        self,
        meta: dict[str, Any],
        nbytes: int,
        writer: Callable[[pa.NativeFile], None],
        segments: list[tuple[int, memoryview]] | None = None,
        pieces: list[tuple[int, memoryview]] | None = None,
    ) -> None:
        self.meta = meta
        self.nbytes = nbytes
        self._writer = writer
        #: (payload offset, buffer) of large buffers the payload holds verbatim: the store hashes
        #: blocks inside them from the source memory while the payload is being written.
        self.segments = segments or []
        #: when not None, the whole payload as (offset, bytes-like) pieces in increasing offset
        #: order, not overlapping; bytes between pieces are zero. Lets the store copy any block of
        #: the payload on its own (copy and hash block by block, in parallel, while it is cached).
        self.pieces = pieces

    @property
    def inlineable(self) -> bool:
        return self.nbytes <= INLINE_THRESHOLD

    def write_into(self, dest: Any) -> None:
        view = memoryview(dest).cast("B")
        if view.nbytes != self.nbytes:
            raise SerializationError(
                f"destination is {view.nbytes} bytes, payload is {self.nbytes}"
            )
        if self.nbytes:
            sink = pa.FixedSizeBufferWriter(_writable_arrow_buffer(view))
            if self.nbytes > 1 << 20:
                sink.set_memcopy_threads(_COPY_THREADS)
            self._writer(sink)
            sink.close()

    def write_to_file(self, path: str) -> None:
        """Write the payload to ``path`` (created or truncated) with plain writes."""
        sink = pa.OSFile(path, mode="w")
        try:
            if self.nbytes:
                self._writer(sink)
            written = sink.tell()
        finally:
            sink.close()
        if written != self.nbytes:
            raise SerializationError(f"wrote {written} bytes, expected {self.nbytes}")

    def to_bytes(self) -> bytes:
        out = bytearray(self.nbytes)
        self.write_into(out)
        return bytes(out)


# --- Arrow: tensors ------------------------------------------------------------------------------


def _serialize_tensor(array: np.ndarray, kind: str) -> SerializedObject:
    if not (array.flags.c_contiguous or array.flags.f_contiguous):
        array = np.ascontiguousarray(array)
    tensor = pa.Tensor.from_numpy(array)
    size = pa.ipc.get_tensor_size(tensor)

    def write(sink: pa.NativeFile) -> None:
        pa.ipc.write_tensor(tensor, sink)

    meta = {"ser": kind, "dtype": array.dtype.str, "shape": list(array.shape)}
    segments = []
    pieces = None
    if array.flags.c_contiguous and array.nbytes >= 1 << 20:
        # an Arrow IPC tensor message ends with the tensor's bytes, verbatim
        body = array.reshape(-1).data.cast("B")
        segments.append((size - array.nbytes, body))
        header = _tensor_header(tensor, size - array.nbytes)
        if header is not None:
            pieces = [(0, memoryview(header)), (len(header), body)]
    return SerializedObject(meta, size, write, segments, pieces)


def _tensor_header(tensor: pa.Tensor, header_size: int) -> bytes | None:
    """The bytes of a tensor IPC message before its body, without copying the body: the message
    is written into a buffer that only has room for the header, so the body write fails."""
    header = bytearray(header_size)
    sink = pa.FixedSizeBufferWriter(pa.py_buffer(header))
    try:
        pa.ipc.write_tensor(tensor, sink)
    except (OSError, pa.ArrowException):
        pass
    else:
        return None  # an empty body: nothing to gain
    return bytes(header) if sink.tell() == header_size else None


# --- Arrow: IPC streams --------------------------------------------------------------------------


def _serialize_stream(
    batches_schema: pa.Schema, batches: list[pa.RecordBatch], kind: str, extra: dict[str, Any]
) -> SerializedObject:
    sizer = pa.MockOutputStream()
    with pa.ipc.new_stream(sizer, batches_schema) as stream_writer:
        for batch in batches:
            stream_writer.write_batch(batch)
    size = sizer.size()

    def write(sink: pa.NativeFile) -> None:
        with pa.ipc.new_stream(sink, batches_schema) as stream_writer:
            for batch in batches:
                stream_writer.write_batch(batch)

    meta = {"ser": kind, "schema": batches_schema.serialize().to_pybytes(), **extra}
    return SerializedObject(meta, size, write)


def _serialize_arrow(value: Any) -> SerializedObject:
    if isinstance(value, pa.Table):
        return _serialize_stream(value.schema, value.to_batches(), "arrow-table", {})
    if isinstance(value, pa.RecordBatch):
        return _serialize_stream(value.schema, [value], "arrow-batch", {})
    if isinstance(value, pa.ChunkedArray):
        table = pa.table({"a": value})
        return _serialize_stream(table.schema, table.to_batches(), "arrow-chunked", {})
    if isinstance(value, pa.Array):
        batch = pa.RecordBatch.from_arrays([value], ["a"])
        return _serialize_stream(batch.schema, [batch], "arrow-array", {})
    raise SerializationError(f"not an Arrow value: {type(value).__name__}")  # pragma: no cover


# --- pickle 5 with out-of-band buffers -----------------------------------------------------------


def _serialize_pickle(value: Any) -> SerializedObject:
    out_of_band: list[pickle.PickleBuffer] = []
    try:
        stream = cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band.append)
    except Exception as exc:
        raise SerializationError(f"cannot pickle {type(value).__name__}: {exc}") from exc
    views: list[memoryview] = []
    for buffer in out_of_band:
        try:
            views.append(buffer.raw())
        except BufferError:  # non-contiguous: unavoidable copy
            views.append(memoryview(bytes(buffer)))
    layout: list[list[int]] = []
    offset = _align(len(stream))
    for view in views:
        layout.append([offset, view.nbytes])
        offset = _align(offset + view.nbytes)
    total = (layout[-1][0] + layout[-1][1]) if layout else len(stream)

    def write(sink: pa.NativeFile) -> None:
        sink.write(stream)
        position = len(stream)
        for (start, length), view in zip(layout, views):
            if start > position:
                sink.write(bytes(start - position))
            sink.write(view)
            position = start + length

    meta = {"ser": "pickle5", "pickle": len(stream), "buffers": layout}
    segments = [(start, view) for (start, length), view in zip(layout, views) if length >= 1 << 20]
    pieces = [(0, memoryview(stream))] + [(start, view) for (start, _), view in zip(layout, views)]
    return SerializedObject(meta, total, write, segments, pieces)


def serialize(value: Any) -> SerializedObject:
    """Serialize ``value``; no copy happens until :meth:`SerializedObject.write_into`."""
    if isinstance(value, np.ndarray) and value.dtype != object and value.dtype.fields is None:
        try:
            return _serialize_tensor(value, "arrow-tensor")
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
            pass  # dtypes Arrow tensors lack (e.g. datetime64, strings): pickle-5 below
    if isinstance(value, (pa.Table, pa.RecordBatch, pa.Array, pa.ChunkedArray)):
        return _serialize_arrow(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.device.type == "cpu":
        serialized = _serialize_tensor(value.detach().numpy(), "torch")
        return serialized
    return _serialize_pickle(value)


def deserialize(meta: dict[str, Any], payload: Any) -> Any:
    """Rebuild a value from ``meta`` and its payload; arrays are views into ``payload``."""
    kind = meta.get("ser") if isinstance(meta, dict) else None
    view = memoryview(payload).cast("B") if not isinstance(payload, pa.Buffer) else None
    source = payload if view is None else pa.py_buffer(view)
    try:
        if kind in ("arrow-tensor", "torch"):
            array = pa.ipc.read_tensor(source).to_numpy()
            wanted = np.dtype(meta["dtype"]) if "dtype" in meta else array.dtype
            if wanted != array.dtype and wanted.itemsize == array.dtype.itemsize:
                array = array.view(wanted)  # e.g. bool travels as uint8
            if kind == "torch":
                import torch

                return torch.from_numpy(array)
            return array
        if kind in ("arrow-table", "arrow-batch", "arrow-array", "arrow-chunked"):
            reader = pa.ipc.open_stream(source)
            if kind == "arrow-batch":
                return reader.read_next_batch()
            if kind == "arrow-array":
                return reader.read_next_batch().column(0)
            table = reader.read_all()
            return table.column(0) if kind == "arrow-chunked" else table
        if kind == "pickle5":
            if view is None:
                view = memoryview(payload)
            stream_len = int(meta["pickle"])
            buffers = [
                view[int(start) : int(start) + int(length)] for start, length in meta["buffers"]
            ]
            for start, length in meta["buffers"]:
                if int(start) < stream_len or int(start) + int(length) > view.nbytes:
                    raise SerializationError("pickle-5 buffer layout lies outside the payload")
            return pickle.loads(view[:stream_len], buffers=buffers)
    except SerializationError:
        raise
    except Exception as exc:
        raise SerializationError(f"cannot deserialize a {kind!r} payload: {exc}") from exc
    raise SerializationError(f"unknown serializer {kind!r}")


_INLINE_MAGIC = b"LRI1"


def serialize_inline(value: Any) -> bytes:
    """Self-describing bytes for a small value: ``b"LRI1" || u32 meta_len || meta || payload``."""
    ser = serialize(value)
    meta = dagcbor.encode(ser.meta)
    header = _INLINE_MAGIC + struct.pack(">I", len(meta)) + meta
    start = _align(len(header))
    out = bytearray(start + ser.nbytes)
    out[: len(header)] = header
    ser.write_into(memoryview(out)[start:])
    return bytes(out)


def deserialize_inline(blob: bytes | memoryview) -> Any:
    view = memoryview(blob)
    if view.nbytes < 8 or bytes(view[:4]) != _INLINE_MAGIC:
        raise SerializationError("not an inline latticaray value (bad magic)")
    (meta_len,) = struct.unpack(">I", view[4:8])
    if 8 + meta_len > view.nbytes:
        raise SerializationError("inline value truncated")
    try:
        meta = dagcbor.decode(view[8 : 8 + meta_len])
    except CodecError as exc:
        raise SerializationError(f"bad inline metadata: {exc}") from None
    return deserialize(meta, view[_align(8 + meta_len) :])
