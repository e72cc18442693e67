"""Circuit relay v2 hop messages against js-libp2p's relay server: a reservation with a voucher."""

from __future__ import annotations

import time

from latticaray.mesh.libp2p.keys import PrivateKey, peer_id_from_text
from latticaray.mesh.libp2p.relay import (
    HOP_PROTOCOL,
    MAX_RELAY_MESSAGE,
    HopMessage,
    HopType,
    RelayPeer,
    RelayStatus,
    open_voucher,
)


async def _hop(conn, message: HopMessage) -> HopMessage:
    stream = await conn.open_stream(HOP_PROTOCOL)
    await stream.write_message(message.encode())
    data = await stream.read_message(MAX_RELAY_MESSAGE, timeout=10)
    await stream.close()
    assert data is not None
    return HopMessage.decode(data)


async def test_we_reserve_on_a_js_relay_and_check_its_voucher(host, js_peer):
    conn = await host.dial(js_peer.addr("tcp"))
    info = await host.identified(conn)
    assert HOP_PROTOCOL in info.protocols
    answer = await _hop(conn, HopMessage(HopType.RESERVE))
    assert answer.type is HopType.STATUS and answer.status is RelayStatus.OK
    assert answer.reservation is not None and answer.reservation.expire > time.time()
    relay_id = peer_id_from_text(js_peer.peer_id)
    voucher = open_voucher(answer.reservation.voucher, relay_id)
    assert voucher.peer == host.peer_id and voucher.expiration == answer.reservation.expire
    assert answer.limit is not None and answer.limit.duration > 0


async def test_connect_to_a_peer_without_reservation_is_refused(host, js_peer):
    conn = await host.dial(js_peer.addr("tcp"))
    nobody = PrivateKey.generate().public_key.peer_id_bytes()
    answer = await _hop(conn, HopMessage(HopType.CONNECT, peer=RelayPeer(nobody)))
    assert answer.type is HopType.STATUS and answer.status is RelayStatus.NO_RESERVATION
