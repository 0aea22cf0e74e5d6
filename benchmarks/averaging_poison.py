"""Parameter averaging under a poisoner: what one replica that serves bad parameters to its stage's averaging does to
the honest replicas, with the robust pull average (the default) and with a plain mean.

One stage of ``--replicas`` stage servers (``swarm.local.LocalSwarm``, real P2P on 127.0.0.1, one validator, a
trainer); after every trainer step each replica runs one averaging round, all at once. The poisoner computes
honestly and sends honest activations and gradients (the validators see nothing wrong: the attack is on averaging
alone), but serves its stage's other replicas ``--scale`` times its parameters (``scale``: what
``join --attack-averaging`` does), or its parameters plus a fixed push of ``--push`` x lr x sqrt(size) per tensor in
one random direction (``push``: a steady drag, as large as a few optimizer steps, hard to tell from a replica that is
merely behind). Every setting trains the same steps from the same seed; at the end each honest replica's validation
loss is measured in-process (the trainer's embedding and head around that replica's stage, on the same validation
batches), with their largest parameter gap. Prints a markdown table.

Settings: ``none`` (no poisoner), ``robust`` (the default: each peer's pull clipped to ``average_clip``'s static
bound and ``average_spread`` x the lower median of the peers' distances; a peer clipped on most tensors
``average_distrust`` rounds running is not heard for a while; a tensor beyond ``average_reject`` x the bound is left
out), ``clip`` (the same without ``average_reject``, the default until 2026-11-29), ``plain`` (``average_clip=0``,
``average_spread=0``, ``average_distrust=0``: the plain mean, what an unclipped all-reduce computes).

    python benchmarks/averaging_poison.py                     # 3 replicas, 40 steps, both attacks
    python benchmarks/averaging_poison.py --replicas 4 --steps 60
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from swarm.data import load_corpus, validation_batches  # noqa: E402
from swarm.local import LocalSwarm  # noqa: E402
from swarm.protocol import encode_tensors  # noqa: E402
from swarm.trainer import TrainerConfig  # noqa: E402


def poison(server, attack: str, scale: float, push: float) -> None:
    """Make ``server`` serve poisoned parameters to its peers' averaging rounds (its own stay honest)."""
    if attack == "scale":  # the red-team option (join --attack-averaging)
        server.config.attack_averaging = scale
        return
    directions = []
    for i, p in enumerate(server.module.parameters()):
        u = torch.randn(p.shape, generator=torch.Generator().manual_seed(1000 + i))
        directions.append(u / u.norm() * push * server.config.lr * math.sqrt(p.numel()))

    async def served():
        return encode_tensors([p.detach().to("cpu") + d for p, d in zip(server.module.parameters(), directions)])

    server._encoded_parameters = served


def run(setting: str, attack: str, args, corpus) -> dict:
    # rounds are driven here, one per replica after every step, all at once: in the background they would run only
    # when the previous one is done, and how many ran would depend on timing (it varied 11-56 between runs)
    stage_config = {"average_every": 0, "accumulate": args.microbatches, "average_timeout": 20.0}
    if setting == "plain":
        stage_config |= {"average_clip": 0.0, "average_spread": 0.0, "average_distrust": 0, "average_reject": 0.0}
    elif setting == "clip":
        stage_config |= {"average_reject": 0.0}
    # the validators stay in warm-up (learning, never flagging) unless --warmup is given: the attack is on averaging
    # alone, and in a stage this small their honest false bans (2 of 3 replicas in one seed with a 10-step warm-up;
    # README, "Honest false bans") would take replicas out of averaging and blur what is measured
    warmup = args.steps + 1 if args.warmup is None else args.warmup
    trainer_config = TrainerConfig(seed=args.seed, batch_size=args.batch_size, microbatches=args.microbatches,
                                   warmup=warmup)  # fmt: skip
    swarm = LocalSwarm((args.replicas,), preset="tiny", seed=args.seed, corpus=corpus, trainer_config=trainer_config,
                       stage_config=stage_config)  # fmt: skip
    result: dict = {}

    async def body(swarm: LocalSwarm) -> None:
        servers = [swarm.servers[(1, r)] for r in range(args.replicas)]
        honest = servers if setting == "none" else servers[:-1]
        if setting != "none":
            poison(servers[-1], attack, args.scale, args.push)
        start = time.perf_counter()
        for step in range(args.steps):
            await swarm.trainer.step(step)
            for server in servers:
                await server.finish_step()  # the step's gradients are in every replica's weights
            await asyncio.gather(*(server.average_now() for server in servers))
        seconds = time.perf_counter() - start
        trainer = swarm.trainer
        batches = validation_batches(corpus.val, args.batch_size, trainer.model_config.seq_len, args.eval_batches)
        losses = []
        with torch.no_grad():
            for server in honest:
                total = [float(trainer.head(server.module(trainer.embedding(x)), y)) for x, y in batches]
                losses.append(sum(total) / len(total))
        params = [[p.detach() for p in s.module.parameters()] for s in honest]
        gap = max((float((a - b).abs().max()) for other in params[1:] for a, b in zip(params[0], other)),
                  default=math.nan)  # nan: one honest replica  # fmt: skip
        banned = swarm.trainer.banned
        result.update(banned=len(banned), val_losses=losses, gap=gap, seconds=seconds,
                      rounds=sum(s.averaging["rounds"] for s in honest),
                      clipped=sum(s.averaging["clipped"] for s in honest),
                      left_out=sum(s.averaging["left_out"] for s in honest),
                      distrusted=sum(s.averaging["distrusted"] for s in honest))  # fmt: skip

    swarm.run(body)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--attacks", default="scale,push")
    p.add_argument("--settings", default="robust,plain",
                   help="comma-separated: robust (the default averaging), clip (robust without average_reject), "
                        "plain (the plain mean)")  # fmt: skip
    p.add_argument("--scale", type=float, default=100.0)
    p.add_argument("--push", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=None,
                   help="honest warm-up steps of the validators (default: the whole run, so they never flag)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.replicas < 2:
        p.error("--replicas must be >= 2 (one of them is the poisoner)")
    torch.set_num_threads(args.threads)
    logging.getLogger("swarm").setLevel(logging.ERROR)  # one warning per clipped round otherwise
    corpus = load_corpus(None)
    print(f"tiny, 1 stage x {args.replicas} replicas, {args.steps} steps x {args.microbatches} micro-batches x "
          f"{args.batch_size} sequences, one averaging round per replica per step, seed {args.seed}\n")  # fmt: skip
    print("| attack | averaging | honest replicas' val loss | largest honest parameter gap | honest rounds | "
          "clipped (peer, tensor) | left out (peer, tensor) | peers distrusted | banned by validators | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    settings = args.settings.split(",")
    if not set(settings) <= {"robust", "clip", "plain"}:
        p.error("--settings: robust, clip or plain")
    rows = [("none", "none")] + [(a, s) for a in args.attacks.split(",") for s in settings]
    for attack, setting in rows:
        r = run(setting, attack, args, corpus)
        label = "default (robust), no poisoner" if setting == "none" else setting
        losses = ", ".join(f"{v:.3f}" for v in r["val_losses"])
        gap = "n/a (one)" if math.isnan(r["gap"]) else f"{r['gap']:.3g}"
        print(f"| {attack} | {label} | {losses} | {gap} | {r['rounds']} | {r['clipped']} | {r['left_out']} | "
              f"{r['distrusted']} | {r['banned']} | {r['seconds']:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
