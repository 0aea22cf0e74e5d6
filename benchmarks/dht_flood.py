"""A stage's announcement key filled with self-signed announcements: when does a fresh reader stop seeing it?

Anyone may announce a stage replica, and hivemind answers a get of a key with its whole dictionary, in one message of
at most 4 MiB, or not at all. For each ``--counts`` N, a fresh 3-node DHT on 127.0.0.1 gets one honest announcement
of stage 1 and then N more, each of a peer id nobody serves and signed under a fresh key, stored through the DHT
protocol at every node (``swarm.local.flood_stage_key``: every node checks every signature, as it would for an
attacker's). A fresh client-mode node (it stores nothing, as a trainer behind NAT) then reads the key, and so does
one of the storing nodes. It also reads the validators' directory of the stage (``ReplicaDirectory``: only the
manifest's validators can write it), which lists the honest replica, and counts the peers left in its routing table.

With ``--view-stages S`` (S > 0), it then floods every stage key of an S-stage run with the largest count and times
a fresh client's read of a trainer's whole routing view (3S + 1 keys: announcements, directories, validators), one
key after another as the trainer read it before, and all at once (``fetch_view``).

Usage: ``python benchmarks/dht_flood.py --counts 1000,5000,10000,15000,20000 [--view-stages 3]`` (about 2 minutes,
and 1 more with ``--view-stages``).
"""

from __future__ import annotations

import argparse
import functools
import time

from hivemind.utils import get_dht_time

from swarm.dht_schema import (
    fetch_directories,
    fetch_stages,
    fetch_validators,
    fetch_view,
    publish_directory,
    publish_stage,
    publish_validator,
)
from swarm.identity import Identity
from swarm.local import flood_stage_key, local_manifest, start_local_dht
from swarm.records import ReplicaDirectory, StageAnnouncement, StageState, ValidatorAnnouncement


async def routing_table_size(_dht, node):
    return len(node.protocol.routing_table.peer_id_to_uid)


def one(n: int) -> dict:
    validator, trainer, authority = Identity.generate(), Identity.generate(), Identity.generate()
    manifest = local_manifest("flood", "tiny", 2, validator, trainer, authority)
    span = tuple(manifest.layer_spans[0])
    first = start_local_dht(manifest, validator)
    honest = Identity.generate()
    dhts = [first, start_local_dht(manifest, honest, first.get_visible_maddrs()),
            start_local_dht(manifest, Identity.generate(), first.get_visible_maddrs())]  # fmt: skip
    try:
        expiration = get_dht_time() + 600
        publish_stage(dhts[1], honest, StageAnnouncement("flood", 0, "QmHonest", StageState.ONLINE, span, 1.0,
                                                         honest.public_key), expiration)  # fmt: skip
        publish_directory(first, validator, ReplicaDirectory("flood", 0, ("QmHonest",), validator.public_key),
                          expiration)  # fmt: skip
        started = time.monotonic()
        accepted = dhts[2].run_coroutine(functools.partial(flood_stage_key, run="flood", stage=0, n=n,
                                                           expiration=expiration, span=span))  # fmt: skip
        flood_s = time.monotonic() - started
        reader = start_local_dht(manifest, trainer, first.get_visible_maddrs(), client_mode=True)
        dhts.append(reader)
        started = time.monotonic()
        seen = fetch_stages(reader, "flood", 0)
        read_s = time.monotonic() - started
        at_node = fetch_stages(dhts[0], "flood", 0)
        listed = {p for d in fetch_directories(reader, "flood", 0) for p in d.peers}
        peers_known = reader.run_coroutine(routing_table_size)
        return {"n": n, "accepted": accepted, "flood_s": flood_s, "seen": len(seen),
                "honest_seen": any(a.peer == "QmHonest" for a in seen), "read_s": read_s, "at_node": len(at_node),
                "listed": "QmHonest" in listed, "peers_known": peers_known}  # fmt: skip
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


def view_read(n: int, n_stages: int, rounds: int = 3) -> dict:
    """Every stage key of an ``n_stages``-stage run flooded with ``n`` records, each stage's honest replica in the
    validator's directory: seconds for a fresh client's read of the whole view, key by key and all at once."""
    validator, trainer, authority = Identity.generate(), Identity.generate(), Identity.generate()
    manifest = local_manifest("flood", "tiny", n_stages, validator, trainer, authority)
    first = start_local_dht(manifest, validator)
    dhts = [first, start_local_dht(manifest, Identity.generate(), first.get_visible_maddrs())]
    try:
        expiration = get_dht_time() + 600
        for k in range(n_stages):
            publish_directory(first, validator, ReplicaDirectory("flood", k, (f"QmHonest{k}",), validator.public_key),
                              expiration)  # fmt: skip
            dhts[1].run_coroutine(functools.partial(flood_stage_key, run="flood", stage=k, n=n, expiration=expiration,
                                                    span=tuple(manifest.layer_spans[k])))  # fmt: skip
        for b in range(n_stages + 1):
            announcement = ValidatorAnnouncement("flood", b, "QmValidator", 1.0, validator.public_key)
            publish_validator(first, validator, announcement, expiration)
        reader = start_local_dht(manifest, trainer, first.get_visible_maddrs(), client_mode=True)
        dhts.append(reader)
        one_by_one, at_once, listed = [], [], 0
        for _ in range(rounds):  # alternating, so that noise hits both alike
            started = time.monotonic()
            for k in range(n_stages):
                fetch_stages(reader, "flood", k)
                fetch_directories(reader, "flood", k)
            for b in range(n_stages + 1):
                fetch_validators(reader, "flood", b)
            one_by_one.append(time.monotonic() - started)
            started = time.monotonic()
            view = fetch_view(reader, "flood", range(n_stages), range(n_stages + 1))
            at_once.append(time.monotonic() - started)
            listed = sum(any(d.peers == (f"QmHonest{k}",) for d in view.directories[k]) for k in range(n_stages))
        return {"n": n, "stages": n_stages, "one_by_one": one_by_one, "at_once": at_once, "listed": listed,
                "validators": sum(len(v) for v in view.validators.values())}  # fmt: skip
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000,5000,10000,15000,20000")
    p.add_argument("--view-stages", type=int, default=0, help="then time a trainer's view read, every stage flooded")
    args = p.parse_args()
    print("| flood records | accepted by the 2 other nodes | seconds to flood | fresh client reads (honest among "
          "them) | seconds to read | a storing node reads | reader's routing table after | directory read after |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (int(c) for c in args.counts.split(",")):
        r = one(n)
        honest = "yes" if r["honest_seen"] else "no"
        listed = "lists" if r["listed"] else "MISSES"
        print(f"| {r['n']} | {r['accepted']} | {r['flood_s']:.1f} | {r['seen']} ({honest}) | {r['read_s']:.1f} "
              f"| {r['at_node']} | {r['peers_known']} peers | {listed} the honest replica |", flush=True)
    if args.view_stages > 0:
        n = max(int(c) for c in args.counts.split(","))
        r = view_read(n, args.view_stages)
        print(f"\nA fresh client's read of the whole view ({3 * r['stages'] + 1} keys), all {r['stages']} stage keys "
              f"flooded with {n} records each: key by key " + ", ".join(f"{t:.1f}" for t in r["one_by_one"])
              + " s; all at once (fetch_view) " + ", ".join(f"{t:.1f}" for t in r["at_once"])
              + f" s; honest replicas found in the directories: {r['listed']} of {r['stages']}; validator "
              f"announcements read: {r['validators']} of {r['stages'] + 1}")


if __name__ == "__main__":
    main()
