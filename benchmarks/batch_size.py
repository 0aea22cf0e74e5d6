"""An honest mesh whose trainer changes its micro-batch size mid-run: do the validators frame the stages?

Trains ``--steps`` steps at batch 4 (the validators learn their baselines and fences at 4 x seq_len tokens), then
``--steps`` more at ``--batch``, and prints the flags and bans after the switch (every worker is honest, so each one
is a false alarm). Usage: ``python benchmarks/batch_size.py --batch 1 --seed 0`` (tiny 2 x 3, ~1 minute).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch

from swarm.data import BatchSampler
from swarm.mesh import Mesh, MeshConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch after the switch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=30, help="steps before the switch, and as many after it")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--replicas", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    cfg = MeshConfig(preset=args.preset, stages=args.stages, replicas=args.replicas, malicious_fraction=0.0,
                     steps=2 * args.steps, warmup=8, seed=args.seed, microbatches=6, eval_every=0,
                     eval_batches=1)  # fmt: skip
    mesh = Mesh(cfg)
    for step in range(args.steps):
        mesh.step(step)
    seen = len(mesh.events)
    mesh.sampler = BatchSampler(mesh.corpus.train, args.batch, mesh.model_config.seq_len, args.seed)
    for step in range(args.steps, 2 * args.steps):
        mesh.step(step)
    after = mesh.events[seen:]
    flags = Counter((e.boundary, e.direction, e.reason) for e in after if e.kind == "flag")
    print(f"batch 4 -> {args.batch}, seed {args.seed}: {sum(flags.values())} flags after the switch, "
          f"honest workers banned: {sorted(mesh.banned()) or 'none'}")
    for (boundary, direction, reason), n in flags.most_common():
        print(f"  boundary {boundary} {direction:8s} {reason}: {n}")


if __name__ == "__main__":
    main()
