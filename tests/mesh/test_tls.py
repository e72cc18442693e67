"""libp2p TLS certificates, ssl contexts and the in-band auth proof: good ones pass, bad refused."""

import asyncio
import datetime as dt
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from latticaray.mesh.errors import HandshakeError
from latticaray.mesh.identity import KeyPair
from latticaray.mesh.tls import (
    LIBP2P_EXTENSION_OID,
    SIGNATURE_PREFIX,
    client_ssl_context,
    encode_signed_key,
    make_auth_proof,
    make_certificate,
    make_certified_key,
    new_auth_nonce,
    server_ssl_context,
    verify_auth_proof,
    verify_certificate,
)


def der(cert):
    return cert.public_bytes(serialization.Encoding.DER)


def build(cert_key, ext_value=None, *, sign_key=None, not_after=None, extra_critical=False):
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "t")])
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(cert_key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(not_after or now + dt.timedelta(days=1))
    )
    if ext_value is not None:
        b = b.add_extension(
            x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, ext_value), critical=True
        )
    if extra_critical:
        b = b.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"), critical=True
        )
    return b.sign(sign_key or cert_key, hashes.SHA256())


def signed_ext(host: KeyPair, cert_key, *, prefix=SIGNATURE_PREFIX):
    spki = cert_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encode_signed_key(host.peer_id.public_key_protobuf, host.sign(prefix + spki))


def test_certificate_proves_the_host_key():
    host = KeyPair.generate()
    cert, cert_key = make_certificate(host)
    assert verify_certificate(der(cert)) == host.peer_id
    assert cert.public_key().public_numbers() == cert_key.public_key().public_numbers()
    # fresh certificate key each time
    cert2, _ = make_certificate(host)
    assert cert2.public_key().public_numbers() != cert.public_key().public_numbers()


@pytest.mark.parametrize("key_type", ["RSA", "SECP256K1", "ECDSA"])
def test_certificates_of_foreign_key_types_prove_their_peer(key_type):
    from latticaray.mesh.identity import PeerId
    from latticaray.mesh.libp2p.keys import KeyType, PrivateKey

    signer = PrivateKey.generate(KeyType[key_type])

    class Host:  # what make_certificate uses of a host key
        peer_id = PeerId.from_key(signer.public_key)
        sign = staticmethod(signer.sign)

    cert, _ = make_certificate(Host)
    peer = verify_certificate(der(cert))
    assert peer == Host.peer_id and peer.key == signer.public_key
    # a certificate whose extension names this key but was signed by another is refused
    other = PrivateKey.generate(KeyType[key_type])
    k = ec.generate_private_key(ec.SECP256R1())
    spki = k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged = encode_signed_key(signer.public_key.to_protobuf(), other.sign(SIGNATURE_PREFIX + spki))
    with pytest.raises(HandshakeError, match="does not verify"):
        verify_certificate(der(build(k, forged)))


def test_hand_built_valid_certificate_is_accepted():
    host = KeyPair.generate()
    k = ec.generate_private_key(ec.SECP256R1())
    assert verify_certificate(der(build(k, signed_ext(host, k)))) == host.peer_id


def test_unsigned_certificate_refused():
    k = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HandshakeError, match="no libp2p public key extension"):
        verify_certificate(der(build(k)))


def test_signature_over_another_key_refused():
    host = KeyPair.generate()
    k, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HandshakeError, match="does not verify"):
        verify_certificate(der(build(k, signed_ext(host, other))))


def test_wrong_prefix_refused():
    host = KeyPair.generate()
    k = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HandshakeError, match="does not verify"):
        verify_certificate(der(build(k, signed_ext(host, k, prefix=b"other:"))))


def test_extension_claiming_someone_elses_key_refused():
    host, victim = KeyPair.generate(), KeyPair.generate()
    k = ec.generate_private_key(ec.SECP256R1())
    spki = k.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ext = encode_signed_key(victim.peer_id.public_key_protobuf, host.sign(SIGNATURE_PREFIX + spki))
    with pytest.raises(HandshakeError, match="does not verify"):
        verify_certificate(der(build(k, ext)))


def test_tampered_certificate_bytes_refused():
    host = KeyPair.generate()
    cert, _ = make_certificate(host)
    raw = bytearray(der(cert))
    # flip a byte inside the signed extension's signature, then a byte in the outer signature
    for index in (raw.find(host.peer_id.public_key_protobuf) + 40, len(raw) - 5):
        bad = bytearray(raw)
        bad[index] ^= 0x01
        with pytest.raises(HandshakeError):
            verify_certificate(bytes(bad))


def test_not_self_signed_refused():
    host = KeyPair.generate()
    k, issuer = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HandshakeError, match="self-signed"):
        verify_certificate(der(build(k, signed_ext(host, k), sign_key=issuer)))


def test_expired_refused():
    host = KeyPair.generate()
    cert, _ = make_certificate(host)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(HandshakeError, match="expired"):
        verify_certificate(der(cert), now=later)


def test_unknown_critical_extension_refused():
    host = KeyPair.generate()
    k = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HandshakeError, match="unknown critical"):
        verify_certificate(der(build(k, signed_ext(host, k), extra_critical=True)))


def test_garbage_extension_and_der_refused():
    k = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(HandshakeError, match="SignedKey"):
        verify_certificate(der(build(k, b"\x30\x03\x04\x01")))
    with pytest.raises(HandshakeError, match="DER"):
        verify_certificate(b"\x30\x82garbage")
    with pytest.raises(HandshakeError, match="over the limit"):
        verify_certificate(b"\x00" * 100_000)


def test_auth_proof_binds_certificate_and_nonce():
    client, server = KeyPair.generate(), KeyPair.generate()
    server_cert = der(make_certificate(server)[0])
    nonce = new_auth_nonce()
    proof = make_auth_proof(client, server_cert, nonce)
    assert verify_auth_proof(proof, server_cert, nonce) == client.peer_id
    # replay with another nonce, or relayed by a MITM presenting its own certificate: refused
    with pytest.raises(HandshakeError, match="does not verify"):
        verify_auth_proof(proof, server_cert, new_auth_nonce())
    mitm_cert = der(make_certificate(KeyPair.generate())[0])
    with pytest.raises(HandshakeError, match="does not verify"):
        verify_auth_proof(proof, mitm_cert, nonce)
    with pytest.raises(HandshakeError, match="bytes"):
        verify_auth_proof(proof[:-1], server_cert, nonce)
    bad = bytearray(proof)
    bad[0] = 9
    with pytest.raises(HandshakeError, match="version"):
        verify_auth_proof(bytes(bad), server_cert, nonce)


async def test_ssl_contexts_tls13_alpn_and_mutual_auth_over_loopback():
    server_key, client_key = KeyPair.generate(), KeyPair.generate()
    server_cert = make_certified_key(server_key)
    seen = asyncio.get_running_loop().create_future()

    async def handle(reader, writer):
        try:
            nonce = new_auth_nonce()
            writer.write(nonce)
            proof = await asyncio.wait_for(reader.readexactly(101), 10)
            seen.set_result(verify_auth_proof(proof, server_cert.certificate_der, nonce))
        except Exception as exc:
            seen.set_exception(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ssl_context(server_cert))
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ssl_context(client_key)
        )
        sslobj = writer.get_extra_info("ssl_object")
        assert sslobj.version() == "TLSv1.3"
        assert sslobj.selected_alpn_protocol() == "libp2p"
        peer_der = sslobj.getpeercert(binary_form=True)
        assert verify_certificate(peer_der) == server_key.peer_id
        nonce = await asyncio.wait_for(reader.readexactly(32), 10)
        writer.write(make_auth_proof(client_key, peer_der, nonce))
        assert await asyncio.wait_for(seen, 10) == client_key.peer_id
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()


def test_contexts_refuse_below_tls13():
    ctx = server_ssl_context(KeyPair.generate())
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
