"""Throughput of the swarm with validators on and off, and of the in-process mesh on the same work.

The swarm is ``swarm.local.LocalSwarm``: S stages x R stage servers, one validator and a trainer in this process, each
on its own hivemind DHT and p2pd, talking real P2P over 127.0.0.1 (as in tests/test_swarm_network.py). "Validators
off" is the same swarm with the trainer vouching for every tensor itself (``TrainerConfig.validate=False``; the stage
servers run with ``trust_trainer=True`` to accept that). The two settings alternate in rounds of a few optimizer steps
in one run (the order flips every round), so machine noise and the model's progress hit both alike. The mesh
(``swarm.mesh.Mesh``: the same model, data and validator in one process, no network) runs the same number of steps of
the same shape, defence on and off, alternating likewise. No attacker; parameter averaging off. Unless ``--detect``
is given the validators stay in warm-up mode throughout (every tensor is summarised, scored, learnt from and signed
for, but nothing is flagged), so that the work being timed is the same in both settings. Prints a markdown
table of tokens/s (tokens = steps x micro-batches x batch size x sequence length).

With ``--validator-process`` the validator runs in a process of its own, pinned to its own CPU core, and everything
else (trainer, stage servers, their p2pd daemons) is pinned to the remaining cores, validators on or off: the shape
of a deployment, where validators are volunteers' CPUs and not the stages' own. The default (everything in one process
on every core) charges the validator's compute to the stages' CPU in full.

    python benchmarks/swarm_throughput.py                               # tiny, 2 stages x 1 replica
    python benchmarks/swarm_throughput.py --preset small --microbatches 8 --validator-process
    python benchmarks/swarm_throughput.py --preset small --stages 4 --replicas 2 --rounds 4 --steps 3
    python benchmarks/swarm_throughput.py --preset small --microbatches 8 --validators 2 --ban-quorum 2   # fan-out 2
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from sentinel.config import SentinelConfig  # noqa: E402
from swarm.data import load_corpus  # noqa: E402
from swarm.identity import Identity  # noqa: E402
from swarm.local import LocalSwarm, start_local_dht  # noqa: E402
from swarm.mesh import Mesh, MeshConfig  # noqa: E402
from swarm.trainer import TrainerConfig  # noqa: E402
from swarm.validator_service import ValidatorService, ValidatorServiceConfig  # noqa: E402


def validator_process(conn, manifest, identity_seed: bytes, peers: list, sentinel: SentinelConfig, cpus: set,
                      threads: int) -> None:  # fmt: skip
    """The validator of ``--validator-process``: joins the swarm's DHT, serves until told to stop over ``conn``,
    then sends its counters back."""
    if cpus:
        os.sched_setaffinity(0, cpus)  # before its p2pd starts, which inherits it
    torch.set_num_threads(threads)
    identity = Identity.from_seed(identity_seed)
    dht = start_local_dht(manifest, identity, peers)

    async def serve() -> None:
        service = ValidatorService(ValidatorServiceConfig(), manifest, identity, sentinel)
        await service.start(dht)
        conn.send("ready")
        while not await asyncio.to_thread(conn.poll, 0.5):
            pass
        conn.recv()
        conn.send({"checks": service.n_checks, "check_s": service.seconds, "cpu_s": time.process_time()})
        await service.shutdown()

    try:
        asyncio.run(serve())
    finally:
        dht.shutdown()


def split_cpus() -> tuple[set, set]:
    """(the validator's core, everyone else's cores), or two empty sets where pinning is not possible."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        return set(), set()
    return {cpus[-1]}, set(cpus[:-1])


def order(round_: int) -> tuple[bool, bool]:
    return (True, False) if round_ % 2 == 0 else (False, True)


def bench_swarm(args, corpus) -> tuple[dict[bool, list[float]], dict]:
    warmup = args.warmup if args.detect else 10**9
    trainer_config = TrainerConfig(seed=args.seed, batch_size=args.batch_size, microbatches=args.microbatches,
                                   warmup=warmup, max_inflight=args.inflight)  # fmt: skip
    stage_config = {"accumulate": args.microbatches, "average_every": 0, "trust_trainer": True}
    drift = max(2, args.replicas // 2 + 1)  # as the mesh and the demo set it
    sentinel = SentinelConfig(drift_senders=drift)
    swarm = LocalSwarm((args.replicas,) * args.stages, preset=args.preset, run_id="bench", seed=args.seed,
                       corpus=corpus, sentinel=sentinel, trainer_config=trainer_config,
                       stage_config=stage_config, validator=not args.validator_process, validators=args.validators,
                       ban_quorum=args.ban_quorum)  # fmt: skip
    seconds: dict[bool, list[float]] = {True: [], False: []}
    info: dict = {}
    children: list = []
    conns: list = []
    if args.validator_process:
        validator_cpus, other_cpus = split_cpus()
        if other_cpus:
            os.sched_setaffinity(0, other_cpus)  # this process and every p2pd it starts from now on
        info["cpus"] = (sorted(validator_cpus), sorted(other_cpus))

    async def wait_for_validator(trainer) -> None:
        deadline = time.monotonic() + 60
        while not all(len(trainer.validators.get(b, [])) >= args.validators for b in range(args.stages + 1)):
            if time.monotonic() > deadline:
                raise RuntimeError("the validator process did not show up in the DHT within 60 s")
            await asyncio.sleep(0.5)
            await trainer.refresh()

    async def body(swarm: LocalSwarm):
        trainer = swarm.trainer
        if children:
            await wait_for_validator(trainer)
        step = 0
        for _ in range(args.warmup):  # untimed: connections, first allocations, the monitors' honest warm-up
            await trainer.step(step)
            step += 1
        for r in range(args.rounds):
            for validate in order(r):
                trainer.config.validate = validate
                await trainer.refresh()  # outside the timed span (it refreshes every 5 s inside it too)
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    await trainer.step(step)
                    step += 1
                seconds[validate].append(time.perf_counter() - t0)
        info.update(retries=trainer.metrics.retries, tainted=trainer.metrics.tainted,
                    seq_len=trainer.model_config.seq_len)  # fmt: skip
        if not children:
            info.update(checks=sum(v.n_checks for v in swarm.validators),
                        check_s=sum(v.seconds for v in swarm.validators))  # fmt: skip
        else:
            for conn in conns:
                conn.send("stop")
            counters = [await asyncio.to_thread(conn.recv) for conn in conns]
            info.update({key: sum(c[key] for c in counters) for key in counters[0]})

    if not args.validator_process:
        swarm.run(body)
        return seconds, info
    ctx = mp.get_context("spawn")

    def start_validator() -> None:  # once the swarm's DHTs are up: the validators join through them
        for identity in swarm.validator_identities:
            conn, theirs = ctx.Pipe()
            child = ctx.Process(target=validator_process, args=(theirs, swarm.manifest, identity.seed(),
                                swarm.initial_peers(), sentinel, validator_cpus, args.threads))  # fmt: skip
            children.append(child)
            conns.append(conn)
            child.start()
            if not conn.poll(90) or conn.recv() != "ready":
                raise RuntimeError("a validator process did not start within 90 s")

    try:
        swarm.run(body, after_dhts=start_validator)
    finally:
        for child in children:
            if child.pid is not None:  # started (start() may have failed)
                child.join(30)
                if child.is_alive():
                    child.kill()
    return seconds, info


def bench_mesh(args, corpus) -> dict[bool, list[float]]:
    meshes = {
        defense: Mesh(MeshConfig(
            preset=args.preset, stages=args.stages, replicas=args.replicas, attack="none", steps=1,
            warmup=args.warmup if args.detect else 10**9, seed=args.seed, defense=defense,
            microbatches=args.microbatches, validators=args.validators, ban_quorum=args.ban_quorum,
            batch_size=args.batch_size, eval_every=0, device="cpu",
        ), corpus=corpus)
        for defense in (True, False)
    }  # fmt: skip
    for mesh in meshes.values():
        for step in range(args.warmup):
            mesh.step(step)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    step = args.warmup
    for r in range(args.rounds):
        for defense in order(r):
            t0 = time.perf_counter()
            for i in range(args.steps):
                meshes[defense].step(step + i)
            seconds[defense].append(time.perf_counter() - t0)
        step += args.steps
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="rounds of (on, off) or (off, on)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per setting per round")
    p.add_argument("--warmup", type=int, default=4, help="untimed honest warm-up steps (validators on)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--inflight", type=int, default=TrainerConfig.max_inflight,
                   help="micro-batches the swarm trainer keeps in flight (1: strictly sequential)")
    p.add_argument("--detect", action="store_true",
                   help="validators flag after --warmup steps (default: they check every tensor, learn and sign, but "
                        "never flag, so that honest false taints, which skip a stage's backward, do not change the "
                        "work being timed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    p.add_argument("--validator-process", action="store_true",
                   help="run the validator in its own process on its own CPU core, everything else on the others")
    p.add_argument("--validators", type=int, default=1,
                   help="validators; each tensor goes to --ban-quorum of them (the default fan-out); with "
                        "--validator-process each in a process of its own, all on the validators' core")
    p.add_argument("--ban-quorum", type=int, default=1)
    p.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    args = p.parse_args()
    if not 1 <= args.ban_quorum <= args.validators:
        p.error("--ban-quorum must be in 1..--validators")
    torch.set_num_threads(args.threads)
    corpus = load_corpus(args.data)

    swarm_s, info = bench_swarm(args, corpus)
    mesh_s = bench_mesh(args, corpus)
    steps = args.rounds * args.steps
    tokens = steps * args.microbatches * args.batch_size * info["seq_len"]

    def row(name: str, on: bool, secs: list[float]) -> str:
        total = sum(secs)
        per_round = ", ".join(f"{tokens / args.rounds / s:.0f}" for s in secs)
        cells = [name, "on" if on else "off", steps, tokens, f"{total:.2f}", f"{tokens / total:.0f}", per_round]
        return "| " + " | ".join(str(c) for c in cells) + " |"

    print(f"\npreset {args.preset}, {args.stages} stages x {args.replicas} replicas, {args.validators} validator(s) "
          f"checking each tensor {args.ban_quorum} time(s), {args.microbatches} "
          f"micro-batches x {args.batch_size} sequences x {info['seq_len']} tokens per step, {args.rounds} rounds x "
          f"{args.steps} steps per setting, {torch.get_num_threads()} torch thread(s), {args.inflight} "
          f"micro-batch(es) in flight, validators "
          f"{'flag after the warm-up' if args.detect else 'in warm-up mode (never flag)'}"
          + (f", validator(s) in process(es) of their own on CPU(s) {info['cpus'][0]}, the rest on {info['cpus'][1]}"
             if args.validator_process else "") + "\n")  # fmt: skip
    print("| system | validators | steps | tokens | seconds | tokens/s | tokens/s per round |")
    print("|---|---|---|---|---|---|---|")
    name = ("swarm (loopback P2P, validator in its own process)" if args.validator_process
            else "swarm (loopback P2P, in-process)")  # fmt: skip
    print(row(name, True, swarm_s[True]))
    print(row(name, False, swarm_s[False]))
    print(row("mesh (in-process, no network)", True, mesh_s[True]))
    print(row("mesh (in-process, no network)", False, mesh_s[False]))
    on, off = sum(swarm_s[True]), sum(swarm_s[False])
    print(f"\nswarm: validators cost {100 * (on - off) / off:+.0f}% wall time; {info['checks']} checks took "
          f"{info['check_s']:.2f} s of validator compute; retries {info['retries']}, tainted {info['tainted']}"
          + (f"; the validator process(es) used {info['cpu_s']:.2f} s of CPU in all" if "cpu_s" in info else ""))
    m_on, m_off = sum(mesh_s[True]), sum(mesh_s[False])
    print(f"mesh: validators cost {100 * (m_on - m_off) / m_off:+.0f}% wall time; swarm/mesh tokens/s with "
          f"validators on: {m_on / on:.2f}, off: {m_off / off:.2f}")


if __name__ == "__main__":
    main()
