"""A DHT peer that stops answering: what does it cost a validator to publish its records?

A peer that freezes (or leaves a network that drops its packets instead of refusing them) stays in the others' routing
tables for a while, and every store that asks it waits hivemind's timeout for it. On a 5-node DHT on 127.0.0.1 (a
validator's node and 4 others, each a ``SentinelDHT`` checking every record as in the swarm), the validator publishes
``--records`` signed taint notices, one after another as it did before 2026-11-30 (one publisher thread, one store at
a time), and all at once (``publish_each``, as its publisher now sends a batch), with every peer answering and with
one of them frozen (SIGSTOP of its DHT's process and its p2pd), each on a fresh DHT, twice, alternating. Prints a
markdown table of seconds.

    python benchmarks/frozen_peer.py                 # 12 records (about 3 minutes)
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from swarm.dht_schema import publish_each, publish_taint, taint_publication  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.local import local_manifest, start_local_dht  # noqa: E402
from swarm.records import Direction, TaintNotice  # noqa: E402


def notices(validator: Identity, first_step: int, n: int) -> list[TaintNotice]:
    return [TaintNotice("frozen", first_step + i, 0, 1, Direction.FORWARD, "QmSender", bytes(32), {"l2": 2.0},
                        "distance:l2", validator.public_key) for i in range(n)]  # fmt: skip


def timed(dht, validator: Identity, batch: list[TaintNotice], at_once: bool) -> tuple[float, int]:
    expiration = get_dht_time() + 300
    started = time.monotonic()
    if at_once:
        stored = publish_each(dht, validator, [taint_publication(n, expiration) for n in batch])
    else:
        stored = [publish_taint(dht, validator, n, expiration) for n in batch]
    return time.monotonic() - started, sum(stored)


def one(records: int, frozen_peer: bool, at_once: bool) -> tuple[float, int]:
    """A fresh 5-node DHT (so that what one run taught the routing tables does not help the next), one peer frozen
    or not, then the timed publication."""
    validator, trainer, authority = Identity.generate(), Identity.generate(), Identity.generate()
    manifest = local_manifest("frozen", "tiny", 2, validator, trainer, authority)
    own = start_local_dht(manifest, validator)
    others = [start_local_dht(manifest, Identity.generate(), own.get_visible_maddrs()) for _ in range(4)]
    frozen: list[psutil.Process] = []
    try:
        timed(own, validator, notices(validator, 10**6, 4), at_once=True)  # every node has talked to every other
        if frozen_peer:
            frozen = [psutil.Process(others[-1].pid), *psutil.Process(others[-1].pid).children(recursive=True)]
            for proc in frozen:
                proc.send_signal(signal.SIGSTOP)
        return timed(own, validator, notices(validator, 0, records), at_once)
    finally:
        for proc in frozen:
            proc.send_signal(signal.SIGCONT)
        for dht in [*others, own]:
            dht.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=12)
    args = p.parse_args()
    rows = []
    for frozen_peer in (False, True):
        for at_once in (False, True, False, True):  # twice each, alternating
            seconds, stored = one(args.records, frozen_peer, at_once)
            state = "one peer frozen" if frozen_peer else "every peer answers"
            rows.append((state, "all at once" if at_once else "one after another", seconds, stored))
            print(f"{state}, {rows[-1][1]}: {seconds:.1f} s", file=sys.stderr, flush=True)
    print(f"\n{args.records} taint notices from one validator's node, a fresh 5-node DHT on 127.0.0.1 for each row\n")
    print("| peers | stores | seconds | per record | stored |")
    print("|---|---|---|---|---|")
    for state, how, seconds, stored in rows:
        print(f"| {state} | {how} | {seconds:.2f} | {seconds / args.records:.2f} | {stored} of {args.records} |")
    slow = {how: [s for st, h, s, _ in rows if st == "one peer frozen" and h == how] for how in
            ("one after another", "all at once")}  # fmt: skip
    print(f"\nbeside a frozen peer, one after another / all at once: "
          f"{sum(slow['one after another']) / sum(slow['all at once']):.1f}x")  # fmt: skip


if __name__ == "__main__":
    main()
