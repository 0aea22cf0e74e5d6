"""Honest false bans in small meshes: `tiny` pipelines of a few replicas a stage, no attacker, long runs.

The detection benchmark runs `small` 8 x 4 for 60 steps; swarms of volunteers start smaller and run longer, and the
model learns fastest in the first tens of steps, where honest drift crosses fences. This runs honest meshes of each
given size over several seeds and counts the honest workers banned, with the method's defaults and, side by side, with
the `--compare` overrides given (JSON SentinelConfig settings, as in `detection.py`). Prints a markdown table; `--out`
also saves it.


    python benchmarks/honest_small.py                                  # 2 stages x 1, 2, 3 replicas, seeds 0-7
    python benchmarks/honest_small.py --compare '{"small_stage_senders": 0}'
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import add_variant_options, emit  # noqa: E402
from benchmarks.common import variants as variants_of  # noqa: E402
from sentinel.config import SentinelConfig  # noqa: E402
from swarm.mesh import Mesh, MeshConfig  # noqa: E402


def run(job: tuple[int, int, int, int, int, str, str]) -> dict:
    stages, replicas, seed, steps, warmup, overrides, routing = job
    torch.set_num_threads(1)
    sentinel = SentinelConfig.from_dict(json.loads(overrides))
    cfg = MeshConfig(preset="tiny", stages=stages, replicas=replicas, steps=steps, warmup=warmup, seed=seed,
                     eval_every=0, sentinel=sentinel, routing=routing)  # fmt: skip
    report = Mesh(cfg).run().report
    return {"replicas": replicas, "seed": seed, "overrides": overrides, "false_bans": report["false_bans"],
            "ban_steps": report["ban_steps"], "tainted": report["tainted_microbatches"],
            "val_loss": report["val_loss"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--replicas", default="1,2,3", help="comma-separated replicas a stage")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    add_variant_options(p)
    args = p.parse_args()
    variants = variants_of(args)
    sizes = [int(r) for r in args.replicas.split(",")]
    jobs = [(args.stages, r, seed, args.steps, args.warmup, v, args.routing) for v in variants for r in sizes
            for seed in range(args.seeds)]  # fmt: skip
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, res in enumerate(pool.map(run, jobs), 1):
            results.append(res)
            print(f"[{i}/{len(jobs)}] {args.stages} x {res['replicas']} seed {res['seed']} {res['overrides']}: "
                  f"honest bans {res['ban_steps'] or 'none'}, {res['tainted']} tainted", file=sys.stderr, flush=True)
    lines = [f"Honest `tiny` meshes, {args.stages} stages, {args.steps} steps, warm-up {args.warmup}, seeds "
             f"0-{args.seeds - 1}, {args.routing} routing: honest workers banned (of all the workers of those runs)",
             "",
             "| replicas a stage | " + " | ".join("defaults" if v == "{}" else f"`{v}`" for v in variants) + " |",
             "|---|" + "---|" * len(variants)]  # fmt: skip
    for r in sizes:
        cells = []
        for v in variants:
            runs = [x for x in results if x["replicas"] == r and x["overrides"] == v]
            banned = sum(len(x["false_bans"]) for x in runs)
            hit = sum(1 for x in runs if x["false_bans"])
            cells.append(f"{banned} of {len(runs) * r * args.stages} ({hit} of {len(runs)} runs)")
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    emit(lines, args.out)


if __name__ == "__main__":
    main()
