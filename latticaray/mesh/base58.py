"""base58btc (the Bitcoin alphabet), the text form of libp2p peer IDs."""

from __future__ import annotations

__all__ = ["base58btc_decode", "base58btc_encode"]

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


def base58btc_encode(data: bytes) -> str:
    """Encode bytes in the Bitcoin base58 alphabet (leading zero bytes become ``1``)."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, rem = divmod(number, 58)
        digits.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(digits))


def base58btc_decode(text: str) -> bytes:
    """Decode base58btc; raises ``ValueError`` naming the first character outside the alphabet."""
    number = 0
    for position, char in enumerate(text):
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise ValueError(f"character {char!r} at position {position} is not base58btc")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\x00" * zeros + body
