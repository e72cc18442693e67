"""What init() says when it cannot join: every address tried, and why; nothing left running."""

import gc
import socket
import threading

import pytest

import latticaray as lattica
from latticaray.mesh.identity import KeyPair
from latticaray.runtime.admission import MeshKey


def test_init_with_an_unreachable_bootstrap_raises_naming_what_was_tried():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # nobody answers here
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        addr = f"/ip4/127.0.0.1/udp/{port}/quic-v1/p2p/{KeyPair.generate().peer_id}"
        threads = {t.name for t in threading.enumerate()}
        with pytest.raises(lattica.MeshUnreachableError) as info:
            lattica.init(bootstrap=[addr], credential=MeshKey.generate().issue(), num_cpus=1)
    assert addr in str(info.value), info.value
    assert isinstance(info.value, ConnectionError)
    assert not lattica.is_initialized()
    assert gc.isenabled()  # init() paused the collector while it ran, and restored it
    assert "latticaray-node" not in {t.name for t in threading.enumerate()} - threads
    # a later init() works: nothing of the failed one is left behind
    lattica.init(num_cpus=1)
    try:
        assert lattica.is_initialized()
    finally:
        lattica.shutdown()
