"""``sentinel-node status``: what the DHT says about a run (manifest, stages, validators, strikes, bans)."""

from __future__ import annotations

import argparse
import json

from node.common import HelpFormatter, add_network_args, expand_peers, parse_key_hex, start_dht, wait_for_manifest


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="print what the DHT says about a run: manifest, stages, validators, strikes, bans",
        description="Connect to the swarm (as a DHT client), verify the run's manifest and print its stage replicas "
        "(state, throughput), validators, strike records and the peers banned by the manifest's quorum, those that no "
        "longer announce a stage included (marked offline; found through the validators' strike index).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR",
                   help="bootstrap multiaddrs (or @PATH of a bootstrap --ready-file)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--authority", required=True, metavar="HEX",
                   help="the swarm authority's public key (64 hex, or @PATH of a .pub file or a --ready-file)")
    p.add_argument("--manifest-timeout", type=float, default=20.0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_network_args(p, port=0, client_mode_flag=False)
    p.set_defaults(func=run, client_mode=True)  # status always joins as a DHT client


def collect(dht, manifest) -> dict:
    """The run's state as plain data (pure reads of the DHT).

    Strike records are read for every peer that announces a stage and every peer in the run's strike index (the peers
    the manifest's validators ban, ``fetch_strike_index``), so a banned peer that went offline (its announcement
    expired) is still listed while its strike records live. A peer is online when it announces a state other than
    OFFLINE. ``directories``: the replicas each validator lists as having answered lately (``ReplicaDirectory``),
    which is how trainers still find them when a stage's announcements cannot be read."""
    from swarm.dht_schema import (
        banned_peers,
        fetch_strike_index,
        fetch_strikes_of,
        fetch_view,
        manifest_copies,
    )
    from swarm.records import StageState

    run = manifest.run_id
    view = fetch_view(dht, run, range(manifest.n_stages), range(manifest.n_stages + 1))  # every key at once
    stages = {k + 1: anns for k, anns in view.stages.items()}
    validators = view.validators
    directories = {k + 1: [d for d in dirs if manifest.is_validator(d.validator)]
                   for k, dirs in view.directories.items()}  # fmt: skip
    announced = {a.peer for anns in stages.values() for a in anns}
    listed = {p for dirs in directories.values() for d in dirs for p in d.peers}
    online = {a.peer for anns in stages.values() for a in anns if a.state != StageState.OFFLINE}
    # the DHT's record validator admits only authorized validators' signed entries; checked again against the manifest
    indexed = {e.peer for e in fetch_strike_index(dht, run) if manifest.is_validator(e.validator)}
    strikes = fetch_strikes_of(dht, run, announced | listed | indexed)
    banned = sorted(banned_peers(strikes, manifest))
    copies = manifest_copies(dht, run, manifest.authority, validators=False)
    kept = manifest_copies(dht, run, manifest.authority, relayed=False)  # the validators' own copies
    return {
        "manifest": {
            "run_id": run, "preset": manifest.preset, "n_stages": manifest.n_stages,
            "layer_spans": [list(s) for s in manifest.layer_spans], "validators": len(manifest.validators),
            "trainers": len(manifest.trainers), "ban_quorum": manifest.ban_quorum,
            "authority": manifest.authority.hex(), "digest": manifest.digest().hex(),
            "copies": [{"publisher": publisher.hex()[:16], "authority": publisher == manifest.authority,
                        "digest": signed.manifest.digest().hex()} for publisher, signed in copies],
            "validator_copies": [publisher.hex()[:16] for publisher, _ in kept],
        },
        "stages": {
            k: [{"peer": a.peer, "state": a.state.name, "throughput": a.throughput, "span": list(a.span)}
                for a in anns]
            for k, anns in stages.items()
        },
        "validators": {b: [{"peer": a.peer, "throughput": a.throughput, "key": a.validator.hex()[:16]} for a in anns]
                       for b, anns in validators.items()},
        "directories": {k: [{"validator": d.validator.hex()[:16], "peers": list(d.peers)} for d in dirs]
                        for k, dirs in directories.items()},
        "strikes": [{"peer": r.peer, "validator": r.validator.hex()[:16], "count": r.count, "banned": r.banned,
                     "step": r.step, "online": r.peer in online} for r in strikes],
        "banned": banned,
        "bans": [{"peer": p, "online": p in online} for p in banned],
    }  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from swarm.dht_schema import SentinelRecordValidator

    authority = parse_key_hex(args.authority)
    policy = SentinelRecordValidator.for_bootstrap(args.run_id, authority)
    dht = start_dht(args, expand_peers(args.initial_peers), [policy])
    try:
        manifest = wait_for_manifest(dht, args.run_id, authority, timeout=args.manifest_timeout)
        dht.add_validators([SentinelRecordValidator.from_manifest(manifest)])
        state = collect(dht, manifest)
    finally:
        dht.shutdown()
    print(json.dumps(state, indent=2, default=str) if args.json else format_status(state))
    return 0


def format_status(state: dict) -> str:
    """The text view of ``collect``'s result."""
    m = state["manifest"]
    lines = [
        f"run {m['run_id']}: preset {m['preset']}, {m['n_stages']} stages {m['layer_spans']}, {m['validators']} "
        f"validator key(s), {m['trainers']} trainer key(s), ban quorum {m['ban_quorum']}",
        f"  authority {m['authority']}",
        f"  digest    {m['digest']}",
    ]
    relays = sum(not c["authority"] for c in m["copies"])
    own = any(c["authority"] for c in m["copies"])
    others = sum(c["digest"] != m["digest"] for c in m["copies"])
    kept = len(m.get("validator_copies", []))
    lines.append(f"  published by {'the authority and ' if own else ''}{relays} relay(s)"
                 f"{'' if own else ' (the authority is not publishing it)'}"
                 f"{f', and {others} copies of another version' if others else ''}"
                 f"{f'; kept by {kept} validator(s)' if kept else ''}")  # fmt: skip
    for k, anns in state["stages"].items():
        lines.append(f"stage {k}: {len(anns)} replica(s)")
        for a in anns:
            mark = "  BANNED" if a["peer"] in state["banned"] else ""
            lines.append(f"  {a['peer']}  {a['state']:<8} {a['throughput']:8.2f} mb/s{mark}")
        dirs = state.get("directories", {}).get(k, [])
        unannounced = sorted({p for d in dirs for p in d["peers"]} - {a["peer"] for a in anns})
        lines.append(f"  listed by {len(dirs)} validator(s) as answering lately"
                     f"{f'; not announced: {unannounced}' if unannounced else ''}")  # fmt: skip
    for b, anns in state["validators"].items():
        lines.append(f"boundary {b}: validators {[a['peer'][:16] + '...' for a in anns] or 'NONE'}")
    online = _online(state)
    lines.append(f"strike records: {len(state['strikes'])}")
    for r in state["strikes"]:
        lines.append(f"  {r['peer']}{'' if r['peer'] in online else ' (offline)'} by {r['validator']}: "
                     f"{r['count']} strike(s), banned={r['banned']}, step {r['step']}")  # fmt: skip
    lines.append(f"banned by quorum ({m['ban_quorum']}): {state['banned'] or 'none'}")
    lines += [f"  {p} (offline)" for p in state["banned"] if p not in online]
    return "\n".join(lines)


def _online(state: dict) -> set[str]:
    """Peers announcing a stage in a state other than OFFLINE: ``collect``'s ``online``."""
    return {a["peer"] for anns in state["stages"].values() for a in anns if a["state"] != "OFFLINE"}
