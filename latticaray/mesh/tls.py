"""libp2p TLS certificates and session-bound peer authentication.

Certificates follow the libp2p TLS handshake spec: each endpoint makes a self-signed X.509
certificate for a fresh (ephemeral) P-256 key and adds the extension
``1.3.6.1.4.1.53594.1.1`` holding the DER ``SignedKey``::

    SignedKey ::= SEQUENCE { publicKey OCTET STRING,   -- libp2p PublicKey protobuf of the host key
                             signature OCTET STRING }  -- host key signs "libp2p-tls-handshake:" + SPKI

where SPKI is the DER SubjectPublicKeyInfo of the certificate key. Verifying a certificate yields
the peer ID it proves; TLS itself proves possession of the certificate key.

Python's :mod:`ssl` will not accept an unknown self-signed *client* certificate, so for TLS over
TCP the client proves its identity in-band right after the handshake (see
:func:`make_auth_proof`): it signs the certificate it saw from the server plus a fresh nonce chosen
by the server, so a proof can neither be relayed by a man in the middle (who would present a
different certificate) nor replayed later (different nonce). The scheme is in
``docs/protocol/mesh.md``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .errors import HandshakeError
from .identity import KeyPair, PeerId, PeerIdError, decode_public_key_protobuf

__all__ = [
    "ALPN_LIBP2P",
    "AUTH_NONCE_LEN",
    "AUTH_PROOF_LEN",
    "LIBP2P_EXTENSION_OID",
    "CertifiedKey",
    "client_ssl_context",
    "make_auth_proof",
    "make_certificate",
    "new_auth_nonce",
    "server_ssl_context",
    "verify_auth_proof",
    "verify_certificate",
]

LIBP2P_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.53594.1.1")
ALPN_LIBP2P = "libp2p"
SIGNATURE_PREFIX = b"libp2p-tls-handshake:"
MAX_CERTIFICATE_BYTES = 16 * 1024
CERT_VALIDITY = _dt.timedelta(days=365)
CERT_BACKDATE = _dt.timedelta(hours=1)

AUTH_PROOF_VERSION = 1
AUTH_PROOF_CONTEXT = b"latticaray-tls-auth-proof:v1:"
AUTH_NONCE_LEN = 32
_PUBKEY_PB_LEN = 36
_ED25519_SIG_LEN = 64
AUTH_PROOF_LEN = 1 + _PUBKEY_PB_LEN + _ED25519_SIG_LEN


# --- minimal DER for SignedKey (two OCTET STRINGs in a SEQUENCE) ---------------------------------


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_tlv(tag: int, value: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(value)) + value


def _der_read(data: bytes, offset: int, expected_tag: int) -> tuple[bytes, int]:
    """Read one TLV with ``expected_tag`` at ``offset``; strict DER (minimal lengths)."""
    if offset + 2 > len(data):
        raise HandshakeError("SignedKey extension is truncated")
    if data[offset] != expected_tag:
        raise HandshakeError(
            f"SignedKey extension: expected DER tag 0x{expected_tag:02x}, got 0x{data[offset]:02x}"
        )
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 3 or pos + count > len(data):
            raise HandshakeError("SignedKey extension has a bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise HandshakeError("SignedKey extension has a non-minimal DER length")
        pos += count
    if pos + length > len(data):
        raise HandshakeError("SignedKey extension value is truncated")
    return data[pos : pos + length], pos + length


def encode_signed_key(public_key_protobuf: bytes, signature: bytes) -> bytes:
    return _der_tlv(0x30, _der_tlv(0x04, public_key_protobuf) + _der_tlv(0x04, signature))


def decode_signed_key(der: bytes) -> tuple[bytes, bytes]:
    body, end = _der_read(der, 0, 0x30)
    if end != len(der):
        raise HandshakeError("SignedKey extension has trailing bytes")
    public_key, pos = _der_read(body, 0, 0x04)
    signature, pos = _der_read(body, pos, 0x04)
    if pos != len(body):
        raise HandshakeError("SignedKey sequence has extra elements")
    return public_key, signature


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertifiedKey:
    """A libp2p certificate with its (ephemeral) private key, in the forms TLS stacks want."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    peer_id: PeerId

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def make_certificate(
    key: KeyPair, *, now: _dt.datetime | None = None
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A fresh self-signed libp2p certificate for ``key`` and the certificate's private key."""
    cert_key = ec.generate_private_key(ec.SECP256R1())
    spki = cert_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signed_key = encode_signed_key(
        key.peer_id.public_key_protobuf, key.sign(SIGNATURE_PREFIX + spki)
    )
    now = now or _dt.datetime.now(_dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, os.urandom(8).hex())])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(cert_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_VALIDITY)
        .add_extension(x509.UnrecognizedExtension(LIBP2P_EXTENSION_OID, signed_key), critical=True)
        .sign(cert_key, hashes.SHA256())
    )
    return cert, cert_key


def make_certified_key(key: KeyPair) -> CertifiedKey:
    cert, cert_key = make_certificate(key)
    return CertifiedKey(cert, cert_key, key.peer_id)


def verify_certificate(
    cert_der: bytes | x509.Certificate, *, now: _dt.datetime | None = None
) -> PeerId:
    """Check a peer's libp2p certificate and return the peer ID it proves.

    Raises :class:`HandshakeError` if the certificate is malformed, expired or not yet valid,
    not self-signed by its own key, lacks exactly one libp2p extension, carries another critical
    extension, or if the host key's signature over the certificate key does not verify.
    """
    if isinstance(cert_der, x509.Certificate):
        cert = cert_der
    else:
        if len(cert_der) > MAX_CERTIFICATE_BYTES:
            raise HandshakeError(f"peer certificate is {len(cert_der)} bytes, over the limit")
        try:
            cert = x509.load_der_x509_certificate(bytes(cert_der))
        except (ValueError, x509.InvalidVersion) as exc:
            raise HandshakeError(f"peer certificate is not valid DER X.509: {exc}") from None
    now = now or _dt.datetime.now(_dt.UTC)
    try:
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except AttributeError:  # cryptography < 42
        not_before = cert.not_valid_before.replace(tzinfo=_dt.UTC)
        not_after = cert.not_valid_after.replace(tzinfo=_dt.UTC)
    if now < not_before:
        raise HandshakeError(f"peer certificate is not valid before {not_before.isoformat()}")
    if now > not_after:
        raise HandshakeError(f"peer certificate expired at {not_after.isoformat()}")
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension) as exc:
        raise HandshakeError(f"peer certificate extensions are malformed: {exc}") from None
    libp2p_ext = [e for e in extensions if e.oid == LIBP2P_EXTENSION_OID]
    if not libp2p_ext:
        raise HandshakeError("peer certificate has no libp2p public key extension (unsigned)")
    if len(libp2p_ext) > 1:
        raise HandshakeError("peer certificate has more than one libp2p extension")
    for ext in extensions:
        if ext.critical and ext.oid != LIBP2P_EXTENSION_OID:
            raise HandshakeError(f"peer certificate has an unknown critical extension {ext.oid}")
    ext_value = libp2p_ext[0].value
    raw = ext_value.value if isinstance(ext_value, x509.UnrecognizedExtension) else None
    if raw is None:
        raise HandshakeError("libp2p extension could not be read")
    public_key_pb, signature = decode_signed_key(raw)
    try:
        # any libp2p key type (Ed25519, RSA, secp256k1, ECDSA): foreign peers are first-class
        peer = PeerId.from_key_protobuf(public_key_pb)
    except PeerIdError as exc:
        raise HandshakeError(f"libp2p extension carries an unusable host key: {exc}") from None
    try:
        cert_public_key = cert.public_key()
        spki = cert_public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise HandshakeError(f"peer certificate key is unusable: {exc}") from None
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
        raise HandshakeError(f"peer certificate is not validly self-signed: {exc!r}") from None
    if not peer.verify(signature, SIGNATURE_PREFIX + spki):
        raise HandshakeError(
            f"libp2p extension signature does not verify for host key {peer}: the certificate "
            f"was tampered with or its key was not signed by that peer"
        )
    return peer


# --- ssl contexts for TLS 1.3 over TCP --------------------------------------------------------------


def _load_into_context(ctx: ssl.SSLContext, certified: CertifiedKey) -> None:
    with tempfile.TemporaryDirectory(prefix="latticaray-tls-") as tmp:
        os.chmod(tmp, 0o700)
        cert_path = os.path.join(tmp, "cert.pem")
        key_path = os.path.join(tmp, "key.pem")
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(certified.private_key_pem())
        with open(cert_path, "wb") as fh:
            fh.write(certified.certificate_pem())
        ctx.load_cert_chain(cert_path, key_path)


def _base_context(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_LIBP2P])
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the peer is checked by verify_certificate / auth proof
    return ctx


def server_ssl_context(key: KeyPair | CertifiedKey) -> ssl.SSLContext:
    """TLS 1.3 server context presenting a libp2p certificate, ALPN ``libp2p``.

    It does not request a client certificate (``ssl`` would reject a self-signed one); the
    client authenticates in-band with :func:`make_auth_proof`.
    """
    certified = key if isinstance(key, CertifiedKey) else make_certified_key(key)
    ctx = _base_context(0)
    _load_into_context(ctx, certified)
    return ctx


def client_ssl_context(key: KeyPair | CertifiedKey) -> ssl.SSLContext:
    """TLS 1.3 client context, ALPN ``libp2p``, no CA checks.

    After the handshake, check the server with
    ``verify_certificate(ssl_object.getpeercert(binary_form=True))``.
    """
    certified = key if isinstance(key, CertifiedKey) else make_certified_key(key)
    ctx = _base_context(1)
    _load_into_context(ctx, certified)
    return ctx


# --- in-band, session-bound authentication proof -------------------------------------------------


def new_auth_nonce() -> bytes:
    return os.urandom(AUTH_NONCE_LEN)


def _auth_message(peer_cert_der: bytes, nonce: bytes) -> bytes:
    return AUTH_PROOF_CONTEXT + hashlib.sha256(bytes(peer_cert_der)).digest() + bytes(nonce)


def make_auth_proof(key: KeyPair, peer_cert_der: bytes, nonce: bytes) -> bytes:
    """Prove ``key``'s identity to the peer whose TLS certificate we saw as ``peer_cert_der``.

    ``nonce`` is the fresh random value the verifier sent over this TLS session. The proof is
    ``0x01 || PublicKey protobuf (36 B) || Ed25519 signature (64 B)`` over
    ``"latticaray-tls-auth-proof:v1:" || SHA-256(peer_cert_der) || nonce``.
    """
    if len(nonce) != AUTH_NONCE_LEN:
        raise HandshakeError(f"auth nonce must be {AUTH_NONCE_LEN} bytes, got {len(nonce)}")
    signature = key.sign(_auth_message(peer_cert_der, nonce))
    return bytes([AUTH_PROOF_VERSION]) + key.peer_id.public_key_protobuf + signature


def verify_auth_proof(proof: bytes, own_cert_der: bytes, nonce: bytes) -> PeerId:
    """Check a peer's proof against the certificate *we* presented and the nonce *we* sent.

    Returns the proven peer ID; raises :class:`HandshakeError` on any mismatch.
    """
    proof = bytes(proof)
    if len(proof) != AUTH_PROOF_LEN:
        raise HandshakeError(f"auth proof is {len(proof)} bytes, expected {AUTH_PROOF_LEN}")
    if proof[0] != AUTH_PROOF_VERSION:
        raise HandshakeError(f"auth proof version {proof[0]} is not supported")
    if len(nonce) != AUTH_NONCE_LEN:
        raise HandshakeError(f"auth nonce must be {AUTH_NONCE_LEN} bytes, got {len(nonce)}")
    try:
        peer = PeerId.from_public_key(decode_public_key_protobuf(proof[1 : 1 + _PUBKEY_PB_LEN]))
    except PeerIdError as exc:
        raise HandshakeError(f"auth proof carries an unusable key: {exc}") from None
    if not peer.verify(proof[1 + _PUBKEY_PB_LEN :], _auth_message(own_cert_der, nonce)):
        raise HandshakeError(
            f"auth proof from {peer} does not verify: it was made for another certificate or "
            f"nonce (possible man in the middle or replay)"
        )
    return peer
