"""``sentinel-node keygen``: create an Ed25519 identity file (the key a node signs records and verdicts with)."""

from __future__ import annotations

import argparse
from pathlib import Path

from node.common import CommandError, write_public_key
from swarm.identity import Identity


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "keygen",
        help="create an Ed25519 identity file and print its public key",
        description="Create an Ed25519 identity (private key file, mode 0600) and print its public key hex and "
        "fingerprint. Give the public key to the swarm authority (--validator-key / --trainer-key).",
    )
    p.add_argument("--out", required=True, metavar="PATH", help="where to write the private key")
    p.add_argument("--force", action="store_true", help="replace an existing file (its old key is lost)")
    p.add_argument("--format", choices=["pem", "raw"], default="pem", help="PEM PKCS#8 or the raw 32-byte seed")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = Path(args.out).expanduser()
    if path.is_dir():
        raise CommandError(f"{path} is a directory; give a file path to --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    identity = Identity.generate()
    try:
        identity.save(path, fmt=args.format, overwrite=args.force)
    except FileExistsError:
        raise CommandError(f"{path} already exists; refusing to overwrite an identity (use --force)") from None
    pub = write_public_key(path, identity)
    print(f"identity:    {path} (public key also in {pub})")
    print(f"public key:  {identity.public_hex}")
    print(f"fingerprint: {identity.fingerprint}")
    return 0
