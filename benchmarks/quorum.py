"""Several validators and a ban quorum, in the mesh: what splitting the checks between validators does to detection.

In a swarm the trainer sends each check to ``check_fanout`` validators at once (by default the ban quorum: README,
"Several validators"), and a peer is banned once the manifest's quorum of validators has banned it; with one check per
tensor among several validators (the 2/2/1 setting, the trainer's behaviour before the fan-out), each validator learns
and keeps strikes from its share of the traffic alone. The mesh does the same with ``MeshConfig.validators`` and
``ban_quorum`` (and ``check_fanout``: each tensor checked by that many validators at once). This runs the shape of the
demo's second command (`tiny` 3 stages x 3 replicas, 2 attackers, 4 micro-batches of 4 sequences a step, lr 3e-3,
warm-up 12 steps, 30 steps) for each (validators, quorum, checks per tensor) setting over several seeds and attacks,
and prints a markdown table of attackers and honest workers banned. ``--compare`` adds the same settings with
SentinelConfig overrides (JSON).


    python benchmarks/quorum.py         # 1/1/1, 2/2/1, 2/2/2, 2/1/1 (validators/quorum/checks per tensor); 3 attacks
    python benchmarks/quorum.py --settings 2/2/1 --compare '{"drift_steps": 8}'
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
from sentinel.config import SentinelConfig  # noqa: E402
from swarm.mesh import Mesh, MeshConfig  # noqa: E402

SHAPE = dict(preset="tiny", stages=3, replicas=3, malicious_fraction=0.23, microbatches=4, batch_size=4, lr=3e-3,
             warmup=12, steps=30, eval_every=0)  # fmt: skip


def run(job: tuple[str, int, int, int, int, str, dict]) -> dict:
    attack, validators, quorum, fanout, seed, overrides, shape = job
    torch.set_num_threads(1)
    sentinel = SentinelConfig.from_dict(json.loads(overrides))
    cfg = MeshConfig(attack=attack, seed=seed, validators=validators, ban_quorum=quorum, check_fanout=fanout,
                     sentinel=sentinel, **shape)  # fmt: skip
    report = Mesh(cfg).run().report
    malicious = report["malicious"]
    return {"attack": attack, "validators": validators, "quorum": quorum, "fanout": fanout, "seed": seed,
            "overrides": overrides,
            "malicious": malicious, "ban_steps": report["ban_steps"], "false_bans": report["false_bans"],
            "caught": sorted(set(report["banned"]) & set(malicious)), "onset": cfg.attack_onset,
            "validator_bans": report["validator_bans"], "val_loss": report["val_loss"]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attacks", default="delay,random_sign,noise", help="group-A names, at their strongest setting")
    p.add_argument("--settings", default="1/1/1,2/2/1,2/2/2,2/1/1",
                   help="validators/quorum/fanout (validators checking each tensor; omitted: the quorum)")
    p.add_argument("--seeds", type=int, default=6)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=SHAPE["steps"])
    add_variant_options(p)
    args = p.parse_args()
    variants = variants_of(args)
    settings = []
    for setting in args.settings.split(","):
        parts = [int(x) for x in setting.split("/")]
        v, q = parts[0], parts[1] if len(parts) > 1 else 1
        settings.append((v, q, parts[2] if len(parts) > 2 else q))
    shape = {**SHAPE, "steps": args.steps, "routing": args.routing}
    for v, q, f in settings:
        MeshConfig(validators=v, ban_quorum=q, check_fanout=f, **shape)  # a bad setting fails here
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    jobs = [(a, v, q, f, s, o, shape) for a in args.attacks.split(",") for v, q, f in settings for o in variants
            for s in seeds]  # fmt: skip
    results = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, res in enumerate(pool.map(run, jobs), 1):
            results.append(res)
            print(f"[{i}/{len(jobs)}] {res['attack']} {res['validators']}/{res['quorum']}/{res['fanout']} "
                  f"{res['overrides']} seed "
                  f"{res['seed']}: bans {res['ban_steps'] or 'none'} (attackers {res['malicious']})",
                  file=sys.stderr, flush=True)  # fmt: skip
    lines = [f"`tiny` 3 x 3, 2 attackers, 4 x 4 sequences a step, lr 3e-3, warm-up 12, {args.steps} steps, seeds "
             f"{seeds[0]}-{seeds[-1]}, each attack at its strongest setting, forward, {args.routing} routing",
             "",
             "| attack | validators / quorum / checks per tensor | overrides | attackers banned | honest banned "
             "(runs) | median steps to ban | validation loss (mean) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for attack in args.attacks.split(","):
        for v, q, f in settings:
            for o in variants:
                runs = [r for r in results if (r["attack"], r["validators"], r["quorum"], r["fanout"], r["overrides"])
                        == (attack, v, q, f, o)]  # fmt: skip
                caught = sum(len(r["caught"]) for r in runs)
                total = sum(len(r["malicious"]) for r in runs)
                honest = sum(len(r["false_bans"]) for r in runs)
                hit = sum(1 for r in runs if r["false_bans"])
                delays = [r["ban_steps"][w] - r["onset"] for r in runs for w in r["caught"]]
                median = f"{statistics.median(delays):g}" if delays else "-"
                loss = statistics.fmean(r["val_loss"] for r in runs)
                label = "defaults" if o == "{}" else f"`{o}`"
                lines.append(f"| {attack} | {v} / {q} / {f} | {label} | {caught} of {total} | {honest} ({hit} of "
                             f"{len(runs)}) | {median} | {loss:.3f} |")  # fmt: skip
    emit(lines, args.out)


if __name__ == "__main__":
    main()
