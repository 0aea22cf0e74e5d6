"""``sentinel-node bootstrap``: a DHT bootstrap peer; with ``--new-swarm`` it also creates, signs and publishes the
swarm manifest (re-publishing it before it expires) and prints the join command of every role."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from node.common import (
    DEFAULT_PORT,
    CommandError,
    StopFlag,
    add_network_args,
    build_manifest,
    check_dht,
    expand_peers,
    format_command,
    join_commands,
    parse_key_hex,
    parse_overrides,
    replace_sentinel,
    say,
    start_dht,
    visible_maddrs,
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
        help="run a DHT bootstrap peer (and, with --new-swarm, create and publish a signed swarm manifest)",
        description="Run a DHT bootstrap peer until SIGINT/SIGTERM and print its multiaddrs. With --new-swarm, act as "
        "the swarm authority: sign the manifest (run id, model, stages, authorized validator and trainer keys, ban "
        "quorum, sentinel settings), keep it published in the DHT, and print each role's join command.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_network_args(p, port=DEFAULT_PORT)
    p.add_argument("--initial-peers", nargs="*", metavar="MADDR", default=[],
                   help="other bootstrap peers to connect to (run two or more for a public swarm)")  # fmt: skip
    g = p.add_argument_group("new swarm (the authority)")
    g.add_argument("--new-swarm", action="store_true", help="create, sign and publish a manifest")
    g.add_argument("--run-id", default=None, help="the run's name ([A-Za-z0-9_-], at most 64)")
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
    g.add_argument("--manifest-ttl", type=float, default=600.0, help="seconds a published manifest lives")
    p.add_argument("--ready-file", metavar="PATH", default=None,
                   help="write a JSON with the multiaddrs (and manifest digest) once up (for scripts)")  # fmt: skip
    p.set_defaults(func=run)


def manifest_json(signed: SignedManifest) -> dict:
    m = signed.manifest
    return {
        "run_id": m.run_id, "preset": m.preset, "n_stages": m.n_stages,
        "layer_spans": [list(s) for s in m.layer_spans],
        "sentinel_config": dict(m.sentinel_config), "validators": [k.hex() for k in m.validators],
        "trainers": [k.hex() for k in m.trainers], "ban_quorum": m.ban_quorum, "created_at": m.created_at,
        "authority": m.authority.hex(), "digest": m.digest().hex(), "signature": signed.signature.hex(),
    }  # fmt: skip


def _new_swarm(args) -> SignedManifest:
    from swarm.identity import load_or_create

    if not args.run_id:
        raise CommandError("--new-swarm needs --run-id")
    if not args.authority_key:
        raise CommandError("--new-swarm needs --authority-key PATH (the authority's identity; created if missing)")
    validators = [parse_key_hex(k) for k in args.validator_key]
    trainers = [parse_key_hex(k) for k in args.trainer_key]
    if args.stages < 1:
        raise CommandError("--stages must be >= 1")
    sentinel = replace_sentinel(SentinelConfig(), parse_overrides(args.sentinel))
    path = Path(args.authority_key).expanduser()
    authority = load_or_create(path)
    write_public_key(path, authority)
    return build_manifest(
        authority, run_id=args.run_id, preset=args.preset, n_stages=args.stages, validators=validators,
        trainers=trainers, ban_quorum=args.ban_quorum, sentinel=sentinel,
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from hivemind.utils import get_dht_time

    from swarm.dht_schema import SentinelRecordValidator, publish_manifest
    from swarm.identity import Identity

    if not args.new_swarm and (args.validator_key or args.trainer_key or args.authority_key):
        raise CommandError("--validator-key, --trainer-key and --authority-key need --new-swarm")
    signed = _new_swarm(args) if args.new_swarm else None
    stop = StopFlag().install()
    validators = []
    authority = None
    if signed is not None:
        authority = Identity.load(Path(args.authority_key).expanduser())
        validators = [SentinelRecordValidator.from_manifest(signed.manifest, authority)]
    dht = start_dht(args, expand_peers(args.initial_peers), validators)
    try:
        maddrs = visible_maddrs(dht)
        say("bootstrap peer is up; other peers join with:")
        say("  --initial-peers " + " ".join(maddrs))
        ready = {"maddrs": maddrs, "peer_id": dht.peer_id.to_base58()}
        if signed is not None:
            manifest = signed.manifest
            default_out = Path(args.authority_key).expanduser().with_name(f"{manifest.run_id}.manifest.json")
            out = Path(args.manifest_out) if args.manifest_out else default_out
            write_json_atomic(out, manifest_json(signed))
            ok = publish_manifest(dht, authority, signed, get_dht_time() + args.manifest_ttl)
            published_at = time.monotonic()
            say(f"manifest for run {manifest.run_id!r} signed by {authority.fingerprint} "
                f"(digest {manifest.digest().hex()[:16]}...) written to {out}; published: {ok}")  # fmt: skip
            for role, argv in join_commands(manifest, maddrs).items():
                say(f"join as {role}:\n  {format_command(argv)}")
            ready.update(run_id=manifest.run_id, authority=manifest.authority.hex(), digest=manifest.digest().hex(),
                         manifest=str(out))  # fmt: skip
        if args.ready_file:
            write_json_atomic(args.ready_file, ready)
        republish = max(5.0, args.manifest_ttl / 3) if signed is not None else None
        while not stop.wait(5.0):  # (republish is at least 5 s)
            check_dht(dht)
            if signed is not None and time.monotonic() - published_at >= republish * 0.99:
                try:
                    publish_manifest(dht, authority, signed, get_dht_time() + args.manifest_ttl)
                    published_at = time.monotonic()
                except Exception as e:  # keep serving the DHT; retry next period
                    log.warning(f"manifest re-publish failed: {type(e).__name__}: {e}")
        say("bootstrap: shutting down")
    finally:
        dht.shutdown()
    return 0
