"""Announced replicas that accept calls and never answer: what they cost a cold-started trainer, hedged and not.

Anyone may announce a stage replica. A peer that accepts every call and never answers used to cost each call that
drew it ``rpc_timeout`` seconds before the next replica was tried (README, "Open membership"). Hedged forwards
(``TrainerConfig.hedge_after``) try the next replica beside it after ``hedge_after`` seconds instead.

Each run is a fresh in-process ``LocalSwarm`` on 127.0.0.1 (real P2P): ``--stages`` stages of ``--honest`` replicas,
with ``--stallers`` red-team peers announcing replicas of stage 1 (each under its own key, with its own DHT), and a
trainer that has never called any of them. It times ``--steps`` steps, hedged (``hedge_after`` 2 s, the default) and
unhedged (0), alternating ``--rounds`` times. Usage: ``python benchmarks/stalling_peers.py`` (about 5 minutes).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from swarm.local import LocalSwarm
from swarm.trainer import NoRoute, TrainerConfig


def one_run(args: argparse.Namespace, hedge_after: float, seed: int) -> dict:
    config = TrainerConfig(seed=seed, batch_size=2, microbatches=args.microbatches, warmup=100,
                           rpc_timeout=args.rpc_timeout, hedge_after=hedge_after)  # fmt: skip
    swarm = LocalSwarm((args.honest,) * args.stages, seed=seed, trainer_config=config,
                       stallers={1: args.stallers})  # fmt: skip
    out: dict = {}

    async def body(swarm: LocalSwarm) -> None:
        trainer = swarm.trainer
        started = time.monotonic()
        step_seconds, failures = [], 0
        step = 0
        while step < args.steps:
            t0 = time.monotonic()
            try:
                await trainer.step(step)  # a failed step is redone, as `sentinel-node join --role trainer` does
                step += 1
            except NoRoute:
                failures += 1
            step_seconds.append(time.monotonic() - t0)
        out.update(seconds=time.monotonic() - started, steps=step_seconds, failed_steps=failures,
                   hedged=trainer.metrics.hedged, retries=trainer.metrics.retries,
                   staller_draws=sum(s.forward_calls for s in swarm.stallers),
                   loss=trainer.metrics.losses[-1])  # fmt: skip

    swarm.run(body)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stallers", type=int, default=8)
    p.add_argument("--honest", type=int, default=2, help="honest replicas of every stage")
    p.add_argument("--stages", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--rpc-timeout", type=float, default=30.0, help="the trainer's (30 s: its default)")
    p.add_argument("--hedge-after", type=float, default=TrainerConfig.hedge_after)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{args.stages} stage(s) x {args.honest} honest replica(s), {args.stallers} staller(s) at stage 1, "
          f"{args.steps} steps of {args.microbatches} micro-batches, rpc_timeout {args.rpc_timeout:g} s")
    print("| hedge_after | round | seconds | seconds per step | failed steps | hedged calls | stallers drawn | loss |")
    print("|---|---|---|---|---|---|---|---|")
    totals: dict[float, list[float]] = {}
    for r in range(args.rounds):
        for hedge in (args.hedge_after, 0.0):
            res = one_run(args, hedge, args.seed + r)
            totals.setdefault(hedge, []).append(res["seconds"])
            per_step = ", ".join(f"{s:.1f}" for s in res["steps"])
            print(f"| {hedge:g} | {r} | {res['seconds']:.1f} | {per_step} | {res['failed_steps']} | {res['hedged']} "
                  f"| {res['staller_draws']} | {res['loss']:.3f} |", flush=True)
    on, off = (sum(totals[h]) for h in (args.hedge_after, 0.0))
    if math.isfinite(on) and on > 0:
        print(f"\nunhedged / hedged wall time: {off / on:.1f}x")


if __name__ == "__main__":
    main()
