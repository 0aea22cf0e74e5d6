"""A stage's announcement key filled with self-signed announcements: when does a fresh reader stop seeing it?

Anyone may announce a stage replica, and hivemind answers a get of a key with its whole dictionary, in one message of
at most 4 MiB, or not at all. For each ``--counts`` N, a fresh 3-node DHT on 127.0.0.1 gets one honest announcement
of stage 1 and then N more, each of a peer id nobody serves and signed under a fresh key, stored through the DHT
protocol at every node (``swarm.local.flood_stage_key``: every node checks every signature, as it would for an
attacker's). A fresh client-mode node (it stores nothing, as a trainer behind NAT) then reads the key, and so does
one of the storing nodes. It also reads the validators' directory of the stage (``ReplicaDirectory``: only the
manifest's validators can write it), which lists the honest replica, and counts the peers left in its routing table.

Usage: ``python benchmarks/dht_flood.py --counts 1000,5000,10000,15000,20000`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import functools
import time

from hivemind.utils import get_dht_time

from swarm.dht_schema import fetch_directories, fetch_stages, publish_directory, publish_stage
from swarm.identity import Identity
from swarm.local import flood_stage_key, local_manifest, start_local_dht
from swarm.records import ReplicaDirectory, StageAnnouncement, StageState


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1000,5000,10000,15000,20000")
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


if __name__ == "__main__":
    main()
