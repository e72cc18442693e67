"""The name arbiter's records (NameArbiterCore, sans-I/O): a released name stays released when a
view still carries a copy of its record (the copy is not merged back), while a new claim of the
same name by another actor is taken."""

from latticaray.runtime.remote.arbiter import RELEASED_MEMORY, NameArbiterCore
from latticaray.runtime.remote.wire import (
    ClaimRefused,
    NameClaim,
    NameLookup,
    NameLookupReply,
    NameRelease,
    NamesOk,
)

OWNER = "owner-node"
FIRST = b"\x01" * 16
SECOND = b"\x02" * 16


def arbiter() -> NameArbiterCore:
    return NameArbiterCore("arbiter-node", lambda node: True, lambda ns, name, aid: None)


def claim(core: NameArbiterCore, aid: bytes):
    request = NameClaim("ns", "web", aid, OWNER, "host-node", {"methods": {}}, False, False)
    return core.handle(request, OWNER)


def lookup(core: NameArbiterCore):
    reply = core.handle(NameLookup("ns", "web"), OWNER)
    assert isinstance(reply, NameLookupReply)
    return reply.existing


def test_a_released_record_is_not_merged_back_from_a_view():
    core = arbiter()
    assert isinstance(claim(core, FIRST), NamesOk)
    stale = core.shared()  # a peer's view carries this copy
    assert isinstance(claim(core, SECOND), ClaimRefused)
    assert isinstance(core.handle(NameRelease("ns", "web", FIRST), OWNER), NamesOk)
    assert lookup(core) is None
    core.merge(stale)
    assert lookup(core) is None
    assert isinstance(claim(core, SECOND), NamesOk)  # the name is free for another actor
    assert lookup(core).aid == SECOND


def test_a_node_forgets_its_copy_when_the_actor_gives_its_name_back():
    holder, other = arbiter(), arbiter()
    claim(other, FIRST)
    holder.merge(other.shared())  # a copy travelled here in a view
    assert lookup(holder).aid == FIRST
    holder.forget("ns", "web", FIRST)  # released by the owner or host on this node
    assert lookup(holder) is None
    holder.merge(other.shared())
    assert lookup(holder) is None


def test_the_released_memory_is_bounded():
    core = arbiter()
    for i in range(RELEASED_MEMORY + 10):
        core.forget("ns", f"n{i}", i.to_bytes(16, "big"))
    assert len(core.released) == RELEASED_MEMORY
    assert (0).to_bytes(16, "big") not in core.released  # the oldest went first
