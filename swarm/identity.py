"""Ed25519 identities: the keys that sign manifests, verdicts and DHT records.

One node has one identity, kept in a file readable only by its owner. The public key (32 raw bytes) is what the
manifest lists and what DHT subkeys carry as the owner marker; the fingerprint (16 hex chars of its sha256) is
what humans compare and type.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
SEED_BYTES = 32
FINGERPRINT_CHARS = 16
_PEM_HEADER = b"-----BEGIN"


class IdentityError(ValueError):
    """An identity file is missing its key, corrupt, or holds a key of the wrong type."""


def fingerprint(public_key: bytes) -> str:
    """Short, human-comparable name of a public key: the first 16 hex chars of sha256(public key)."""
    return hashlib.sha256(public_key).hexdigest()[:FINGERPRINT_CHARS]


class Identity:
    """An Ed25519 key pair. Construct with `generate`, `load`, `from_seed` or `load_or_create`."""

    __slots__ = ("_private_key", "_public_key")

    def __init__(self, private_key: Ed25519PrivateKey):
        if not isinstance(private_key, Ed25519PrivateKey):
            raise TypeError(f"expected an Ed25519PrivateKey, got {type(private_key).__name__}")
        self._private_key = private_key
        self._public_key = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity whose private key is this 32-byte seed (the raw Ed25519 private key)."""
        if not isinstance(seed, bytes) or len(seed) != SEED_BYTES:
            raise IdentityError(f"an Ed25519 seed is {SEED_BYTES} bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The 32-byte private seed. Secret: hand it only to code that signs on this node's behalf."""
        return self._private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte public key."""
        return self._public_key

    @property
    def public_hex(self) -> str:
        return self._public_key.hex()

    @property
    def fingerprint(self) -> str:
        return fingerprint(self._public_key)

    def sign(self, data: bytes) -> bytes:
        """A 64-byte Ed25519 signature of `data`."""
        return self._private_key.sign(data)

    @staticmethod
    def verify(public_key: bytes, data: bytes, signature: bytes) -> bool:
        """Whether `signature` is `public_key`'s signature of `data`. Never raises: bad input of any kind is False."""
        if not (isinstance(public_key, bytes) and isinstance(data, bytes) and isinstance(signature, bytes)):
            return False
        if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True

    def save(self, path: str | os.PathLike, *, fmt: str = "pem", overwrite: bool = False) -> None:
        """Write the private key to `path` with mode 0600: `fmt="pem"` (PKCS#8) or `fmt="raw"` (the 32-byte seed).

        Refuses to replace an existing file (FileExistsError) unless `overwrite=True`, which replaces it atomically.
        """
        if fmt == "pem":
            data = self._private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        elif fmt == "raw":
            data = self.seed()
        else:
            raise ValueError(f"unknown identity file format {fmt!r} (use 'pem' or 'raw')")

        path = Path(path)
        if not overwrite:
            # O_EXCL: fails if the file exists, even if another process created it a moment ago
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._write(fd, path, data)
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._write(fd, tmp, data)
        os.replace(tmp, path)  # atomic: readers see the old key or the new one, never half a file

    @staticmethod
    def _write(fd: int, path: Path, data: bytes) -> None:
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            os.chmod(path, 0o600)  # os.open's mode is filtered by the umask, and an existing file keeps its mode
        except BaseException:
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike) -> Identity:
        """Read a key written by `save` (PEM PKCS#8 or a raw 32-byte seed). Raises IdentityError if corrupt."""
        data = Path(path).read_bytes()
        if data.lstrip().startswith(_PEM_HEADER):
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as e:
                raise IdentityError(f"identity file {path} is not a readable PEM private key: {e}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise IdentityError(f"identity file {path} holds a {type(key).__name__}, not an Ed25519 key")
            return cls(key)
        if len(data) == SEED_BYTES:
            return cls.from_seed(data)
        raise IdentityError(
            f"identity file {path} is corrupt: expected a PEM Ed25519 key or a {SEED_BYTES}-byte seed, "
            f"found {len(data)} bytes"
        )

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self.fingerprint})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other._public_key == self._public_key

    def __hash__(self) -> int:
        return hash(self._public_key)


def load_or_create(path: str | os.PathLike, *, fmt: str = "pem") -> Identity:
    """Load the identity at `path`, or generate one and save it there (mode 0600) if the file does not exist."""
    path = Path(path)
    if path.exists():
        return Identity.load(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    try:
        identity.save(path, fmt=fmt)
    except FileExistsError:  # another process created it first: use theirs
        return Identity.load(path)
    return identity
