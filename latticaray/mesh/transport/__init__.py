"""Transports: QUIC (aioquic), TCP + TLS 1.3, same-host Unix sockets; all mutually authenticated."""
