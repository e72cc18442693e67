"""Round trips of every supported type through the shm store, with zero-copy asserted by address."""

import pickle

import numpy as np
import pyarrow as pa
import pytest

from latticaray.objectstore.errors import SerializationError
from latticaray.objectstore.serialization import (
    INLINE_THRESHOLD,
    deserialize,
    deserialize_inline,
    serialize,
    serialize_inline,
)


def _inside(address: int, payload: memoryview) -> bool:
    base = _address_of(payload)
    return base <= address < base + payload.nbytes


def _address_of(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).__array_interface__["data"][0] if view.nbytes else 0


def _arrow_addresses(value):
    if isinstance(value, pa.Table):
        return [
            b.address
            for col in value.columns
            for chunk in col.chunks
            for b in chunk.buffers()
            if b is not None
        ]
    if isinstance(value, pa.RecordBatch):
        return [b.address for col in value.columns for b in col.buffers() if b is not None]
    if isinstance(value, pa.ChunkedArray):
        return [b.address for chunk in value.chunks for b in chunk.buffers() if b is not None]
    return [b.address for b in value.buffers() if b is not None]


ARRAY = np.arange(200_000, dtype=np.float64).reshape(400, 500)


@pytest.mark.parametrize(
    "value",
    [
        ARRAY,
        np.asfortranarray(ARRAY),
        ARRAY[::2],  # non-contiguous: copied once on put, zero-copy on get
        np.arange(100_000, dtype=np.int8) % 2 == 0,
        np.zeros((0, 3), dtype=np.float32),
    ],
    ids=["c-order", "f-order", "strided", "bool", "empty"],
)
def test_numpy_round_trip_zero_copy(make_store, value):
    store = make_store()
    stored = store.get_object(store.put(value))
    assert stored.manifest.meta["ser"] == "arrow-tensor"
    result = stored.value()
    np.testing.assert_array_equal(result, value)
    assert result.dtype == value.dtype and result.shape == value.shape
    if result.size:
        assert not result.flags.writeable
        address = result.__array_interface__["data"][0]
        assert _inside(address, stored.payload), "array is not a view of the shm mapping"
        assert address % 64 == 0


@pytest.mark.parametrize(
    "make_value,kind",
    [
        (
            lambda: pa.table({"x": np.arange(50_000), "s": [str(i) for i in range(50_000)]}),
            "arrow-table",
        ),
        (lambda: pa.RecordBatch.from_pydict({"f": np.linspace(0, 1, 30_000)}), "arrow-batch"),
        (lambda: pa.array(np.arange(40_000, dtype=np.int32)), "arrow-array"),
        (lambda: pa.chunked_array([pa.array([1, 2, None]), pa.array([4])]), "arrow-chunked"),
    ],
)
def test_arrow_round_trip_zero_copy(make_store, make_value, kind):
    store = make_store()
    value = make_value()
    stored = store.get_object(store.put(value))
    assert stored.manifest.meta["ser"] == kind
    result = stored.value()
    assert result.equals(value)
    addresses = _arrow_addresses(result)
    assert addresses and all(_inside(a, stored.payload) for a in addresses)


def test_pickle5_nested_buffers_zero_copy(make_store):
    store = make_store()
    big = np.random.default_rng(1).standard_normal(300_000)
    strings = np.array(["a", "bc", "def"])  # Arrow tensors lack unicode: pickle-5 path
    value = {
        "weights": big,
        "names": strings,
        "nested": [1, "two", (3.0, None)],
        "raw": pickle.PickleBuffer(bytearray(b"x" * 100_000)),
    }
    stored = store.get_object(store.put(value))
    assert stored.manifest.meta["ser"] == "pickle5"
    result = stored.value()
    np.testing.assert_array_equal(result["weights"], big)
    assert list(result["names"]) == ["a", "bc", "def"] and result["nested"] == [
        1,
        "two",
        (3.0, None),
    ]
    assert _inside(result["weights"].__array_interface__["data"][0], stored.payload)
    assert not result["weights"].flags.writeable


def test_plain_objects_and_functions_round_trip(make_store):
    store = make_store()

    def square(x):
        return x * x

    assert store.get(store.put(square))(7) == 49
    for value in (None, 3, "text", {"k": [1, 2]}, b"bytes" * 10, 2.5):
        assert store.get(store.put(value)) == value


def test_torch_tensor_round_trip(make_store):
    torch = pytest.importorskip("torch")  # optional dependency; the Arrow path is tested above
    store = make_store()
    tensor = torch.arange(1000, dtype=torch.float32)
    result = store.get(store.put(tensor))
    assert isinstance(result, torch.Tensor) and torch.equal(result, tensor)


def test_small_values_are_inlineable_and_self_describing():
    small = serialize({"a": 1})
    assert small.inlineable and not serialize(np.zeros(INLINE_THRESHOLD)).inlineable
    value = {"a": np.arange(10), "b": "x"}
    back = deserialize_inline(serialize_inline(value))
    np.testing.assert_array_equal(back["a"], value["a"]) and back["b"] == "x"
    assert deserialize_inline(serialize_inline(np.arange(5))).tolist() == [0, 1, 2, 3, 4]


def test_bad_payloads_raise_serialization_error():
    with pytest.raises(SerializationError, match="magic"):
        deserialize_inline(b"nope")
    with pytest.raises(SerializationError, match="unknown serializer"):
        deserialize({"ser": "martian"}, b"")
    with pytest.raises(SerializationError):
        deserialize({"ser": "arrow-tensor"}, b"\x00" * 16)
    with pytest.raises(SerializationError, match="outside"):
        deserialize(
            {"ser": "pickle5", "pickle": 4, "buffers": [[64, 10_000]]}, b"\x80\x05N." + b"\0" * 60
        )
