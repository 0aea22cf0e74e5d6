"""Detection benchmark: every group-A attack, forward and backward, over several seeds, plus honest runs.

Prints and saves a markdown table of F1, time to ban, false bans, taint precision/recall and the validation-loss gap
(defended vs the attack-free run with the same seed, and the undefended run under the same attack).

    python benchmarks/detection.py                       # the issue's setting: small, 8 stages x 4 replicas
    python benchmarks/detection.py --preset tiny --stages 4 --steps 40 --warmup 15 --seeds 1 --jobs 2   # quick look
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sentinel.attacks import STRONGEST, WEAKEST  # noqa: E402
from sentinel.config import SentinelConfig  # noqa: E402
from swarm.mesh import Mesh, MeshConfig  # noqa: E402

GROUP_A = ["zeros", "constant", "random", "scaling", "random_sign", "bias", "noise", "delay", "nonfinite", "mixed"]


def run_job(job: tuple[str, dict]) -> tuple[str, dict]:
    label, cfg_dict = job
    import torch

    torch.set_num_threads(1)
    sentinel = SentinelConfig.from_dict(cfg_dict.pop("sentinel"))
    cfg = MeshConfig(**cfg_dict, sentinel=sentinel)
    report = Mesh(cfg).run().report
    keep = ("f1", "precision", "recall", "banned", "false_bans", "time_to_ban", "taint_precision", "taint_recall",
            "val_loss", "tokens_per_s", "validator_time_fraction", "validator_check_s", "stage_call_s",
            "tainted_microbatches", "poisoned_microbatches", "microbatches", "malicious")
    return label, {k: report[k] for k in keep}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--stages", type=int, default=8)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--honest-seeds", type=int, default=5)
    p.add_argument("--attacks", default=",".join(GROUP_A))
    p.add_argument("--directions", default="forward,backward")
    p.add_argument("--weak", action="store_true", help="also the weak settings")
    p.add_argument("--only-weak", action="store_true", help="only the weak settings (implies --weak)")
    p.add_argument("--no-undefended", action="store_true", help="skip the undefended runs (faster)")
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--sentinel", default="{}", help="JSON overrides of SentinelConfig")
    p.add_argument("--out", default="benchmarks/results/detection")
    p.add_argument("--reuse-undefended", metavar="JSON",
                   help="take the clean and undefended runs from an earlier result file of the same settings "
                        "(they do not involve the validator, so a change to the method leaves them unchanged)")
    args = p.parse_args()

    base = MeshConfig(preset=args.preset, stages=args.stages, replicas=args.replicas, steps=args.steps,
                      warmup=args.warmup, eval_every=0)
    sentinel = SentinelConfig.from_dict(json.loads(args.sentinel))

    def job(label: str, **kw) -> tuple[str, dict]:
        cfg = replace(base, sentinel=sentinel, **kw)
        d = cfg.to_dict()
        d.pop("onset")
        d["onset"] = cfg.onset
        return label, d

    jobs = []
    for seed in range(max(args.seeds, args.honest_seeds)):
        jobs.append(job(f"clean|{seed}", attack="none", defense=False, seed=seed))
        if seed < args.honest_seeds:
            jobs.append(job(f"honest|{seed}", attack="none", seed=seed))
    settings = [] if args.only_weak else [("strong", STRONGEST)]
    settings += [("weak", WEAKEST)] if args.weak or args.only_weak else []
    for attack in args.attacks.split(","):
        for strength, table in settings:
            if strength == "weak" and table.get(attack) == STRONGEST.get(attack):
                continue
            for direction in args.directions.split(","):
                for seed in range(args.seeds):
                    params = dict(table.get(attack, {}))
                    key = f"{attack}|{strength}|{direction}|{seed}"
                    jobs.append(job("def|" + key, attack=attack, attack_params=params, attack_direction=direction,
                                    seed=seed))
                    if not args.no_undefended:
                        jobs.append(job("undef|" + key, attack=attack, attack_params=params,
                                        attack_direction=direction, seed=seed, defense=False))
    results: dict[str, dict] = {}
    if args.reuse_undefended:
        earlier = json.loads(Path(args.reuse_undefended).read_text())
        for key in ("preset", "stages", "replicas", "steps", "warmup"):
            if earlier["args"][key] != getattr(args, key):
                raise SystemExit(f"--reuse-undefended: {key} differs ({earlier['args'][key]} vs {getattr(args, key)})")
        reused = {k: r for k, r in earlier["results"].items() if k.startswith(("clean|", "undef|"))}
        jobs = [j for j in jobs if j[0] not in reused]
        results.update(reused)
        print(f"reusing {len(reused)} attack-free and undefended runs", file=sys.stderr)
    print(f"{len(jobs)} runs on {args.jobs} processes", file=sys.stderr)
    start = time.time()
    with mp.get_context("spawn").Pool(args.jobs) as pool:
        for i, (label, rep) in enumerate(pool.imap_unordered(run_job, jobs), 1):
            results[label] = rep
            print(f"[{i}/{len(jobs)} {time.time() - start:.0f}s] {label}: f1={rep['f1']:.2f} "
                  f"bans={len(rep['banned'])} false={len(rep['false_bans'])} val={rep['val_loss']:.3f}",
                  file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    table = render(results, args)
    Path(str(out) + ".md").write_text(table)
    print(table)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else None


def _fmt(x, spec=".2f"):
    return "n/a" if x is None else format(x, spec)


def render(results: dict[str, dict], args) -> str:
    lines = [f"preset={args.preset} stages={args.stages} replicas={args.replicas} steps={args.steps} "
             f"warmup={args.warmup} seeds={args.seeds} sentinel={args.sentinel}", ""]
    honest = [r for k, r in results.items() if k.startswith("honest|")]
    if honest:
        fb = sum(len(r["false_bans"]) for r in honest)
        taint = sum(r["tainted_microbatches"] for r in honest) / max(1, sum(r["microbatches"] for r in honest))
        vtf = _mean([r["validator_time_fraction"] for r in honest])
        lines.append(f"Honest runs: {len(honest)} seeds, false bans {fb}, tainted micro-batches {100 * taint:.2f}%, "
                     f"validator time / stage fwd+bwd time {100 * vtf:.1f}%")
        lines.append("")
    lines.append("| attack | setting | dir | F1 | TTB median | TTB p95 | TTB max | never | false bans | taint P "
                 "| taint R | val defended | val clean | gap % | val undefended |")
    lines.append("|" + "---|" * 15)
    clean = {k.split("|")[1]: r["val_loss"] for k, r in results.items() if k.startswith("clean|")}
    groups: dict[tuple, list] = {}
    for k, r in results.items():
        if k.startswith("def|"):
            _, attack, strength, direction, seed = k.split("|")
            groups.setdefault((attack, strength, direction), []).append((seed, r))
    for (attack, strength, direction), runs in sorted(groups.items()):
        ttb = [r["time_to_ban"] for _, r in runs]
        vd = _mean([r["val_loss"] for _, r in runs])
        vc = _mean([clean.get(s) for s, _ in runs])
        vu = _mean([results.get(f"undef|{attack}|{strength}|{direction}|{s}", {}).get("val_loss") for s, _ in runs])
        gap = None if vd is None or vc is None else 100 * (vd - vc) / vc
        lines.append(
            f"| {attack} | {strength} | {direction} | {_fmt(_mean([r['f1'] for _, r in runs]))} "
            f"| {_fmt(_mean([t['median'] for t in ttb]), '.1f')} | {_fmt(_mean([t['p95'] for t in ttb]), '.1f')} "
            f"| {_fmt(max((t['max'] for t in ttb if t['max'] is not None), default=None), '.0f')} "
            f"| {sum(t['never'] for t in ttb)} | {sum(len(r['false_bans']) for _, r in runs)} "
            f"| {_fmt(_mean([r['taint_precision'] for _, r in runs]))} "
            f"| {_fmt(_mean([r['taint_recall'] for _, r in runs]))} | {_fmt(vd, '.3f')} | {_fmt(vc, '.3f')} "
            f"| {_fmt(gap, '+.1f')} | {_fmt(vu, '.3f')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
