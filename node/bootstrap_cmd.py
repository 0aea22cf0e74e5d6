"""``sentinel-node bootstrap``: a DHT bootstrap peer; with ``--new-swarm`` it also creates, signs and publishes the
swarm manifest (re-publishing it before it expires) and prints the join command of every role; with ``--run-id`` and
``--authority`` it relays a swarm's manifest (keeps the authority-signed manifest published, so that nodes can join
while the authority is down)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

from node.common import (
    DEFAULT_PORT,
    CommandError,
    HelpFormatter,
    StopFlag,
    add_network_args,
    build_manifest,
    check_dht,
    expand_peers,
    format_command,
    join_commands,
    load_manifest_json,
    manifest_json,
    parse_key_hex,
    parse_overrides,
    replace_sentinel,
    say,
    start_dht,
    visible_maddrs,
    wait_for_signed_manifest,
    write_json_atomic,
    write_public_key,
)
from sentinel.config import SentinelConfig
from swarm.model import PRESETS
from swarm.records import SignedManifest

log = logging.getLogger("sentinel.bootstrap")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="run a DHT bootstrap peer (with --new-swarm, create and publish a signed swarm manifest; with --run-id "
        "and --authority, relay one)",
        description="Run a DHT bootstrap peer until SIGINT/SIGTERM and print its multiaddrs. With --new-swarm, act as "
        "the swarm authority: sign the manifest (run id, model, stages, authorized validator and trainer keys, ban "
        "quorum, sentinel settings), keep it published in the DHT, and print each role's join command. With --run-id "
        "and --authority instead, relay that swarm's manifest: keep the authority-signed manifest published (from the "
        "DHT or --manifest FILE), so that nodes can join while the authority is down.",
        formatter_class=HelpFormatter,
    )
    add_network_args(p, port=DEFAULT_PORT)
    p.add_argument("--initial-peers", nargs="*", metavar="MADDR", default=[],
                   help="other bootstrap peers to connect to (run two or more for a public swarm)")  # fmt: skip
    g = p.add_argument_group("new swarm (the authority)")
    g.add_argument("--new-swarm", action="store_true", help="create, sign and publish a manifest")
    g.add_argument("--run-id", default=None,
                   help="the run's name ([A-Za-z0-9_-], at most 64); with --authority instead of --new-swarm, the "
                        "run whose manifest to relay")  # fmt: skip
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size")
    g.add_argument("--stages", type=int, default=2, help="untrusted pipeline stages")
    g.add_argument("--validator-key", nargs="+", default=[], metavar="HEX",
                   help="authorized validators' public keys (hex or @PATH.pub)")
    g.add_argument("--trainer-key", nargs="+", default=[], metavar="HEX",
                   help="authorized trainers' public keys (hex or @PATH.pub)")
    g.add_argument("--ban-quorum", type=int, default=1, help="distinct validators that must ban a peer")
    g.add_argument("--authority-key", metavar="PATH", default=None,
                   help="the authority's identity file (created if missing)")  # fmt: skip
    g.add_argument("--sentinel", nargs="*", default=[], metavar="KEY=VALUE",
                   help="sentinel settings for the manifest (e.g. ban_level=3 drift_senders=2); default: the defaults")
    g.add_argument("--manifest-out", metavar="PATH", default=None,
                   help="write the signed manifest (JSON) here (default: next to --authority-key)")  # fmt: skip
    g.add_argument("--manifest-ttl", type=float, default=600.0,
                   help="seconds a published manifest lives (re-published every third of it; relays too)")
    g = p.add_argument_group("relay (keep another authority's manifest published)")
    g.add_argument("--authority", metavar="HEX", default=None,
                   help="with --run-id: relay that run's manifest signed by this authority (64 hex, or @PATH of its "
                        ".pub file or of its --ready-file), so that nodes can join while the authority is down")
    g.add_argument("--manifest", metavar="PATH", default=None,
                   help="the signed manifest file the authority wrote (its --manifest-out); default: fetch it from "
                        "the DHT at start")  # fmt: skip
    g.add_argument("--manifest-timeout", type=float, default=60.0,
                   help="seconds to wait for the manifest in the DHT (without --manifest)")
    p.add_argument("--ready-file", metavar="PATH", default=None,
                   help="write a JSON with the multiaddrs (and manifest digest) once up (for scripts)")  # fmt: skip
    p.set_defaults(func=run)


def _new_swarm(args) -> SignedManifest:
    from swarm.identity import load_or_create

    if not args.run_id:
        raise CommandError("--new-swarm needs --run-id")
    if not args.authority_key:
        raise CommandError("--new-swarm needs --authority-key PATH (the authority's identity; created if missing)")
    validators = [parse_key_hex(k, ready_file=False) for k in args.validator_key]
    trainers = [parse_key_hex(k, ready_file=False) for k in args.trainer_key]
    if args.stages < 1:
        raise CommandError("--stages must be >= 1")
    sentinel = replace_sentinel(SentinelConfig(), parse_overrides(args.sentinel))
    path = Path(args.authority_key).expanduser()
    authority = load_or_create(path)
    write_public_key(path, authority)
    signed = build_manifest(
        authority, run_id=args.run_id, preset=args.preset, n_stages=args.stages, validators=validators,
        trainers=trainers, ban_quorum=args.ban_quorum, sentinel=sentinel,
    )  # fmt: skip
    out = _manifest_out(args, args.run_id)
    if not out.exists():
        return signed
    # a restart of the authority with the same command: the swarm goes on under the manifest it already has (its
    # digest is pinned in every join command printed); re-signing would have made a new one and stranded them
    try:
        existing = load_manifest_json(out, authority.public_key)
    except CommandError as e:
        raise CommandError(f"{out} exists and is not this authority's manifest ({e}); move it away to create the "
                           "swarm afresh") from None  # fmt: skip
    if dataclasses.replace(existing.manifest, created_at=signed.manifest.created_at) != signed.manifest:
        raise CommandError(f"{out} holds run {args.run_id!r}'s manifest with other settings, and the swarm's nodes "
                           "check its digest: run with the settings it was created with, or move it away to create "
                           "the swarm afresh (a new manifest, a new digest in every join command)")  # fmt: skip
    say(f"resuming run {args.run_id!r} with its manifest in {out} (digest {existing.manifest.digest().hex()[:16]}...)")
    return existing


def _manifest_out(args, run_id: str) -> Path:
    default = Path(args.authority_key).expanduser().with_name(f"{run_id}.manifest.json")
    return Path(args.manifest_out).expanduser() if args.manifest_out else default


def run(args: argparse.Namespace) -> int:
    from hivemind.utils import get_dht_time

    from swarm.dht_schema import SentinelRecordValidator, publish_manifest
    from swarm.identity import Identity

    if not args.new_swarm and (args.validator_key or args.trainer_key or args.authority_key):
        raise CommandError("--validator-key, --trainer-key and --authority-key need --new-swarm")
    relay_of = None
    if args.new_swarm and (args.authority or args.manifest):
        raise CommandError("--authority and --manifest relay another swarm's manifest: not with --new-swarm (whose "
                           "authority is --authority-key)")  # fmt: skip
    if not args.new_swarm and (args.authority or args.manifest or args.run_id):
        if not (args.authority and args.run_id):
            raise CommandError("relaying a manifest needs both --run-id and --authority")
        relay_of = parse_key_hex(args.authority)
    signed = _new_swarm(args) if args.new_swarm else None
    if relay_of is not None and args.manifest:
        signed = load_manifest_json(args.manifest, relay_of)
        if signed.manifest.run_id != args.run_id:
            raise CommandError(f"{args.manifest} is the manifest of run {signed.manifest.run_id!r}, "
                               f"not {args.run_id!r}")
    stop = StopFlag().install()
    validators = []
    publisher = None  # who signs the published copy: the authority, or this relay's own (ephemeral) identity
    if args.new_swarm:
        publisher = Identity.load(Path(args.authority_key).expanduser())
        validators = [SentinelRecordValidator.from_manifest(signed.manifest, publisher)]
    elif relay_of is not None:
        publisher = Identity.generate()
        validators = [
            SentinelRecordValidator.from_manifest(signed.manifest, publisher) if signed is not None
            else SentinelRecordValidator.for_bootstrap(args.run_id, relay_of, publisher)
        ]  # fmt: skip
    dht = start_dht(args, expand_peers(args.initial_peers), validators)
    try:
        maddrs = visible_maddrs(dht)
        say("bootstrap peer is up; other peers join with:")
        say("  --initial-peers " + " ".join(maddrs))
        ready = {"maddrs": maddrs, "peer_id": dht.peer_id.to_base58()}
        if relay_of is not None and signed is None:
            say(f"relay: waiting for the manifest of run {args.run_id!r} in the DHT")
            signed = wait_for_signed_manifest(dht, args.run_id, relay_of, timeout=args.manifest_timeout, stop=stop)
            dht.add_validators([SentinelRecordValidator.from_manifest(signed.manifest, publisher)])
        if signed is not None:
            manifest = signed.manifest
            if relay_of is None:  # the authority also writes the manifest file
                out = _manifest_out(args, manifest.run_id)
                write_json_atomic(out, manifest_json(signed))
                ready["manifest"] = str(out)
            ok = publish_manifest(dht, publisher, signed, get_dht_time() + args.manifest_ttl)
            published_at = time.monotonic()
            ready.update(run_id=manifest.run_id, authority=manifest.authority.hex(), digest=manifest.digest().hex())
            if relay_of is not None:
                say(f"relaying the manifest of run {manifest.run_id!r} signed by {manifest.authority.hex()[:16]}... "
                    f"(digest {manifest.digest().hex()[:16]}...); published: {ok}")  # fmt: skip
            else:
                say(f"manifest for run {manifest.run_id!r} signed by {publisher.fingerprint} "
                    f"(digest {manifest.digest().hex()[:16]}...) written to {out}; published: {ok}")  # fmt: skip
                for role, argv in join_commands(manifest, maddrs).items():
                    note = " (one per replica: change --stage, and give each its own --identity file)"
                    say(f"join as {role}{note if role == 'gpu-stage' else ''}:\n  {format_command(argv)}")
        if args.ready_file:
            write_json_atomic(args.ready_file, ready)
        republish = max(5.0, args.manifest_ttl / 3) if signed is not None else None
        while not stop.wait(5.0):  # (republish is at least 5 s)
            check_dht(dht, stop)
            if signed is not None and time.monotonic() - published_at >= republish * 0.99:
                try:
                    if relay_of is not None:
                        signed = _newer_manifest(dht, signed, relay_of, publisher)
                    publish_manifest(dht, publisher, signed, get_dht_time() + args.manifest_ttl)
                    published_at = time.monotonic()
                except Exception as e:  # keep serving the DHT; retry next period
                    log.warning(f"manifest re-publish failed: {type(e).__name__}: {e}")
        say("bootstrap: shutting down")
    finally:
        dht.shutdown()
    return 0


def _newer_manifest(dht, signed: SignedManifest, authority: bytes, publisher) -> SignedManifest:
    """A relay follows the authority: a newer manifest of the run (a swarm re-created under the same run id, with
    other validators, say) replaces the one it relays; an older one never does."""
    from swarm.dht_schema import SentinelRecordValidator, fetch_manifest

    latest = fetch_manifest(dht, signed.manifest.run_id, authority)
    if latest is None or latest.manifest.created_at <= signed.manifest.created_at:
        return signed
    say(f"relay: the authority published a newer manifest (digest {latest.manifest.digest().hex()[:16]}...); "
        f"relaying it instead")  # fmt: skip
    dht.add_validators([SentinelRecordValidator.from_manifest(latest.manifest, publisher)])
    return latest
