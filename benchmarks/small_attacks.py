"""Attacks on a small mesh: the demo's shape (`tiny` 2 x 2, one attacker in four), every attack at its weakest and
strongest setting, over several seeds, with the method's defaults and, side by side, with the `--compare` overrides.

`detection.py` measures `small` 8 x 4, where every monitor has 4 senders; the demo's stages have 2, where the drift
guard's small-stage rules apply. Per (attack, setting, direction, variant): attackers banned, honest workers banned,
the median step of the attackers' bans, the mean validation loss. Prints a markdown table; `--out` also saves it.

    python benchmarks/small_attacks.py --compare '{"input_explains": 0}'
    python benchmarks/small_attacks.py --forward noise,delay --backward "" --seeds 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.common import add_variant_options, emit  # noqa: E402
from benchmarks.common import variants as variants_of  # noqa: E402
from sentinel.attacks import STRONGEST, WEAKEST  # noqa: E402
from sentinel.config import SentinelConfig  # noqa: E402
from swarm.mesh import Mesh, MeshConfig  # noqa: E402

# the demo's training settings in the mesh: 4 micro-batches of 4 sequences a step, lr 3e-3, warm-up 6
SHAPE = dict(preset="tiny", stages=2, replicas=2, malicious_fraction=0.25, microbatches=4, batch_size=4, lr=3e-3,
             warmup=6, eval_every=0)  # fmt: skip


def run(job: tuple[str, dict, str, int, int, str, str]) -> dict:
    attack, params, direction, seed, steps, overrides, routing = job
    torch.set_num_threads(1)
    cfg = MeshConfig(attack=attack, attack_params=params, attack_direction=direction, seed=seed, steps=steps,
                     sentinel=SentinelConfig.from_dict(json.loads(overrides)), routing=routing, **SHAPE)  # fmt: skip
    r = Mesh(cfg).run().report
    malicious = set(r["malicious"])
    return {"caught": len(malicious & set(r["banned"])), "malicious": len(malicious), "false": len(r["false_bans"]),
            "steps": [s for w, s in r["ban_steps"].items() if w in malicious], "val": r["val_loss"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forward", default="scaling,random_sign,bias,noise,delay,constant,random",
                   help="attacks on activations (comma-separated; empty for none)")
    p.add_argument("--backward", default="scaling,random_sign,bias,noise", help="attacks on gradients")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    add_variant_options(p)
    args = p.parse_args()
    variants = variants_of(args)
    cases = []
    for direction, names in (("forward", args.forward), ("backward", args.backward)):
        for name in filter(None, names.split(",")):
            if name not in STRONGEST:
                p.error(f"unknown attack {name!r}; one of {', '.join(STRONGEST)}")
            settings = [("weakest", WEAKEST[name]), ("strongest", STRONGEST[name])]
            cases += [(name, label, params, direction) for label, params in settings if params or label == "strongest"]
    jobs = [(name, params, direction, seed, args.steps, v, args.routing)
            for name, _, params, direction in cases for v in variants for seed in range(args.seeds)]  # fmt: skip
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = []
        for i, res in enumerate(pool.map(run, jobs), 1):
            results.append(res)
            print(f"[{i}/{len(jobs)}] {jobs[i - 1][0]} {jobs[i - 1][1]} {jobs[i - 1][2]} seed {jobs[i - 1][3]} "
                  f"{jobs[i - 1][5]}: {res['caught']}/{res['malicious']} banned, {res['false']} honest",
                  file=sys.stderr, flush=True)  # fmt: skip
    by_key: dict[tuple, list[dict]] = {}
    for job, res in zip(jobs, results):
        by_key.setdefault((job[0], json.dumps(job[1]), job[2], job[5]), []).append(res)
    title = (f"`tiny` 2 x 2, one attacker in four, {args.steps} steps, warm-up {SHAPE['warmup']}, "
             f"{args.routing} routing")
    header = ("| attack | setting | direction | variant | attackers banned | honest banned | median ban step | "
              "validation loss (mean) |")  # fmt: skip
    lines = [f"{title}, seeds 0-{args.seeds - 1}", "", header, "|---|---|---|---|---|---|---|---|"]
    for name, label, params, direction in cases:
        for v in variants:
            rows = by_key[(name, json.dumps(params), direction, v)]
            steps = [s for r in rows for s in r["steps"]]
            lines.append(f"| {name} | {label} {json.dumps(params)} | {direction} | {'defaults' if v == '{}' else v} | "
                         f"{sum(r['caught'] for r in rows)} of {sum(r['malicious'] for r in rows)} | "
                         f"{sum(r['false'] for r in rows)} | {statistics.median(steps) if steps else '-'} | "
                         f"{statistics.mean(r['val'] for r in rows):.3f} |")  # fmt: skip
    emit(lines, args.out)


if __name__ == "__main__":
    main()
