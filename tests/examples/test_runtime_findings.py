"""Runtime behaviour the examples ran into, as minimal tests (reported to the runtime's owners).

A finding that fails is marked xfail(strict=True) with the reason; once the runtime is fixed it
passes, strict turns that into a failure, and the marker goes (as it went for the kill below:
a killed actor's resources are free when kill() returns).
"""

from __future__ import annotations

import pytest

import latticaray as lattica


@pytest.fixture
def slot_node():
    lattica.init(num_cpus=1, resources={"slot": 1})
    yield
    lattica.shutdown()


@lattica.remote
class Holder:
    def ping(self) -> int:
        return 1


def test_an_actor_created_right_after_a_kill_gets_the_freed_resources(slot_node):
    first = Holder.options(resources={"slot": 1}).remote()
    assert lattica.get(first.ping.remote(), timeout=60) == 1
    lattica.kill(first)
    second = Holder.options(resources={"slot": 1}).remote()
    assert lattica.get(second.ping.remote(), timeout=60) == 1
