"""Runtime behaviour the examples ran into, as minimal tests (reported to the runtime's owners).

Marked xfail(strict=True): each fails today for the reason given; once the runtime is fixed it
passes, strict turns that into a failure, and the marker must go.
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


@pytest.mark.xfail(
    strict=True,
    raises=lattica.ActorDiedError,
    reason="a killed actor's resources are released after kill() returns; an actor created "
    "right after that needs them is refused at once ('not enough local resources: slot short "
    "by 1') instead of waiting for them, as Ray's pending actors do",
)
def test_an_actor_created_right_after_a_kill_gets_the_freed_resources(slot_node):
    first = Holder.options(resources={"slot": 1}).remote()
    assert lattica.get(first.ping.remote(), timeout=60) == 1
    lattica.kill(first)
    second = Holder.options(resources={"slot": 1}).remote()
    assert lattica.get(second.ping.remote(), timeout=60) == 1
