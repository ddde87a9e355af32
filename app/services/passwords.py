"""Password hashes for the users file: salted scrypt, in a self-describing string.

Format: ``scrypt$<n>$<r>$<p>$<salt, base64>$<hash, base64>``. The string names its algorithm and
cost, so a file written today still verifies after the defaults rise, and a weak entry is
recognisable. scrypt (hashlib, OpenSSL's) is memory-hard: a GPU farm pays for memory per guess,
which an unsalted SHA-256 (odpo's old format) never made it do. Defaults are OWASP's for scrypt
(n = 2**17, r = 8, p = 1: 128 MiB and ~0.3 s per hash on one core of a 2026 server CPU).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass

ALGORITHM = "scrypt"
DEFAULT_N, DEFAULT_R, DEFAULT_P = 2**17, 8, 1
WEAK_BELOW_N = 2**14  # entries cheaper than this verify, and the file's loader warns about them
_MAX_N = 2**20  # a cost a login may pay; a file asking for more is refused, not obeyed
_SALT_BYTES, _HASH_BYTES = 16, 32


@dataclass(frozen=True)
class ScryptHash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes

    def encode(self) -> str:
        b64 = base64.b64encode
        return f"{ALGORITHM}${self.n}${self.r}${self.p}${b64(self.salt).decode()}${b64(self.digest).decode()}"

    @property
    def weak(self) -> bool:
        return self.n < WEAK_BELOW_N


def hash_password(password: str, *, n: int = DEFAULT_N, r: int = DEFAULT_R, p: int = DEFAULT_P) -> str:
    """A fresh salted hash of `password` (the salt comes from os.urandom)."""
    if not password:
        raise ValueError("a password cannot be empty")
    salt = os.urandom(_SALT_BYTES)
    return ScryptHash(n, r, p, salt, _scrypt(password, salt, n, r, p)).encode()


def parse_hash(encoded: str) -> ScryptHash:
    """Parse a stored hash; ValueError (one line) names what is wrong with it."""
    parts = encoded.split("$") if isinstance(encoded, str) else []
    if len(parts) != 6 or parts[0] != ALGORITHM:
        raise ValueError(f"expected {ALGORITHM}$n$r$p$salt$hash (as `odpo users add` writes)")
    try:
        n, r, p = (int(x) for x in parts[1:4])
        salt, digest = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, base64.binascii.Error):
        raise ValueError("the scrypt parameters, salt or hash are not numbers / base64") from None
    if n < 2 or n & (n - 1) or n > _MAX_N or not 1 <= r <= 64 or not 1 <= p <= 16:
        raise ValueError(f"scrypt cost out of range (n a power of two up to {_MAX_N}, r 1..64, p 1..16)")
    if len(salt) < 8 or len(digest) < 16:
        raise ValueError("the salt or hash is too short")
    return ScryptHash(n, r, p, salt, digest)


def verify_password(password: str, stored: ScryptHash) -> bool:
    """Constant-time comparison of `password`'s hash under the stored salt and cost."""
    candidate = _scrypt(password or "", stored.salt, stored.n, stored.r, stored.p, dklen=len(stored.digest))
    return hmac.compare_digest(candidate, stored.digest)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = _HASH_BYTES) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, dklen=dklen,
                          maxmem=2 * 128 * n * r * p + (1 << 20))
