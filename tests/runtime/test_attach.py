"""A driver attached to a running node process with init(address=...)."""

import numpy as np
import pytest
from meshutil import NodeProcess

import latticaray as lattica


@lattica.remote
def square(x):
    return x * x


@lattica.remote
class Box:
    def __init__(self):
        self.items = []

    def add(self, item):
        self.items.append(item)
        return len(self.items)


@pytest.fixture
def node_process():
    node = NodeProcess(None, None)
    yield node
    node.stop()


def test_attach_to_node_process(node_process):
    address = node_process.info["driver_address"]
    info = lattica.init(address=address)
    try:
        assert info["node_id"] == node_process.node_id
        assert lattica.get([square.remote(i) for i in range(50)]) == [i * i for i in range(50)]
        box = Box.remote()
        assert lattica.get([box.add.remote(i) for i in range(5)]) == [1, 2, 3, 4, 5]
        big = np.arange(1 << 19, dtype=np.int64)
        ref = lattica.put(big)
        assert int(lattica.get(square.remote(ref))[-1]) == ((1 << 19) - 1) ** 2
        assert lattica.get(ref.cid).shape == big.shape
        assert lattica.get_runtime_context().node_id == node_process.node_id
    finally:
        lattica.shutdown()
    assert not lattica.is_initialized()
