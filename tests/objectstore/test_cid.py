"""CID, multihash and DAG-CBOR tests, with published IPFS / RFC 8949 vectors."""

import pytest

from latticaray.objectstore import dagcbor
from latticaray.objectstore.cid import (
    BLAKE3,
    DAG_CBOR,
    RAW,
    Cid,
    blake3_available,
    decode_varint,
    encode_varint,
)
from latticaray.objectstore.errors import CodecError, InvalidCid

# `ipfs add --cid-version=1 --raw-leaves` of the empty file and of "hello world" (no newline).
IPFS_VECTORS = {
    b"": "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku",
    b"hello world": "bafkreifzjut3te2nhyekklss27nh3k72ysco7y32koao5eei66wof36n5e",
}


@pytest.mark.parametrize("content,expected", list(IPFS_VECTORS.items()))
def test_raw_leaf_cids_match_ipfs(content, expected):
    cid = Cid.of(content, RAW)
    assert str(cid) == expected
    parsed = Cid.parse(expected)
    assert parsed == cid and parsed.codec == RAW and parsed.verify(content)
    assert Cid.decode(bytes(cid)) == cid
    assert bytes(cid)[:4] == b"\x01\x55\x12\x20"


def test_dag_cbor_cids_have_bafy_prefix_and_round_trip():
    cid = Cid.of(dagcbor.encode({"a": 1}), DAG_CBOR)
    assert str(cid).startswith("bafyrei")
    assert Cid.parse(str(cid)) == cid and cid.codec_name == "dag-cbor"


def test_varints():
    for value in (0, 1, 127, 128, 300, 2**35):
        encoded = encode_varint(value)
        assert decode_varint(encoded) == (value, len(encoded))
    assert encode_varint(300) == b"\xac\x02"
    with pytest.raises(InvalidCid, match="minimally"):
        decode_varint(b"\x80\x00")
    with pytest.raises(InvalidCid, match="truncated"):
        decode_varint(b"\x80")


@pytest.mark.parametrize(
    "bad,message",
    [
        ("", "empty"),
        ("QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH", "CIDv0"),
        ("zb2rhe5P4gXftAwvA4eXQ5HJwsER2owDyS9sKaQRRVQPn93bA", "multibase"),
        ("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyk", "digest|base32"),
        ("bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvykU", "base32-lower"),
        ("b!!!!", "base32"),
    ],
)
def test_bad_cid_strings_give_precise_errors(bad, message):
    with pytest.raises(InvalidCid, match=message):
        Cid.parse(bad)


def test_bad_binary_cids():
    good = bytes(Cid.of(b"x"))
    with pytest.raises(InvalidCid, match="version"):
        Cid.decode(b"\x02" + good[1:])
    with pytest.raises(InvalidCid, match="codec"):
        Cid.decode(b"\x01\x99\x01" + good[2:])
    with pytest.raises(InvalidCid, match="multihash"):
        Cid.decode(b"\x01\x55\x13\x20" + good[4:])
    with pytest.raises(InvalidCid, match="digest bytes"):
        Cid.decode(good[:-1])


def test_verify_rejects_other_content():
    assert not Cid.of(b"hello world").verify(b"hello world!")


@pytest.mark.skipif(not blake3_available(), reason="optional blake3 package not installed")
def test_blake3_multihash():
    cid = Cid.of(b"hello world", RAW, BLAKE3)
    assert bytes(cid)[:4] == b"\x01\x55\x1e\x20"
    assert (
        Cid.parse(str(cid)) == cid and cid.verify(b"hello world") and cid != Cid.of(b"hello world")
    )


def test_dag_cbor_rfc8949_vectors_and_canonical_order():
    assert dagcbor.encode({"a": 1, "b": [2, 3]}).hex() == "a26161016162820203"
    assert dagcbor.encode([1, [2, 3], [4, 5]]).hex() == "8301820203820405"
    # keys sort by length first, then bytes
    assert dagcbor.encode({"aa": 2, "b": 1, "a": 0}).hex() == "a3616100616201626161" + "02"
    value = {
        "n": -5,
        "big": 2**40,
        "s": "é",
        "b": b"\x00\x01",
        "l": [None, True, False],
        "link": Cid.of(b"hello world"),
    }
    assert dagcbor.decode(dagcbor.encode(value)) == value


@pytest.mark.parametrize(
    "data,message",
    [
        (bytes.fromhex("a2616201616100"), "canonical"),  # keys out of order
        (bytes.fromhex("1817"), "shortest"),  # 23 encoded in two bytes
        (bytes.fromhex("9f01ff"), "indefinite"),
        (bytes.fromhex("f93c00"), "float"),
        (bytes.fromhex("c10a"), "tag"),
        (bytes.fromhex("0101"), "trailing"),
        (bytes.fromhex("5a7fffffff"), "exceeds"),  # declared length past the end
        (bytes.fromhex("81" * 40 + "00"), "deeper"),
        (bytes.fromhex("d82a4401551220"), "CID|link"),
        (bytes.fromhex("a161ff00"), "UTF-8"),
    ],
)
def test_dag_cbor_rejects_malformed_input(data, message):
    with pytest.raises(CodecError, match=message):
        dagcbor.decode(data)


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.binary(max_size=64),
    st.text(max_size=32),
)
_values = st.recursive(
    _scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5), st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=100, deadline=None)
@given(_values)
def test_dag_cbor_round_trips_and_is_deterministic(value):
    encoded = dagcbor.encode(value)
    assert dagcbor.decode(encoded) == value
    assert dagcbor.encode(dagcbor.decode(encoded)) == encoded


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoders(data):
    try:
        dagcbor.decode(data)
    except CodecError:
        pass
    try:
        Cid.decode(data)
    except InvalidCid:
        pass
