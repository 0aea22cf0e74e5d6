"""The demo swarm over many projection draws: honest bans, attackers banned, honest taints, side by side.

Each run is a whole `sentinel-node demo` (separate processes on loopback), with the manifest's sentinel `seed` set to
one of the given seeds: the validators' random projections (the sliced-Wasserstein and `fit` directions) are drawn
from it (with private projections, the default, together with each validator's key, new in every demo run; with
`--no-private-projections` from it alone). Every variant runs on every seed, one after the other (the runs are
paired: the same seeds, the same machine load). A variant is a JSON list of extra demo arguments, e.g.
`["--sentinel", "fit_max_fence=0"]`.

Per run, from the demo's report and the validator's check log: the honest peers banned, the attackers banned, the
validation loss, the honest senders' tainted checks (not screens of an already tainted micro-batch), how many of
those had `fit` among the distances over their fences, and the most strikes an honest peer held at a settled step
(the ban level is 3).

    python benchmarks/demo_draws.py --seeds 1-20                          # the demo test's swarm, defaults
    python benchmarks/demo_draws.py --seeds 1-20 --variants '[[], ["--sentinel", "fit_max_fence=0"]]'
    python benchmarks/demo_draws.py --demo-args "--stages 2 --replicas 3 --attackers 2 --attack A7" --seeds 1-8
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_TEST = "--stages 1 --replicas 2 --steps 10 --microbatches 4"  # tests/test_node_demo.py's swarm


def seeds_of(text: str) -> list[int]:
    """``1-20`` or ``0,3,5`` (or both, comma-separated)."""
    out: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return out


def label(variant: list[str]) -> str:
    """A variant as the tables and the progress lines name it."""
    return shlex.join(variant) or "defaults"


def honest_checks(log_path: Path, honest: set[str]) -> tuple[int, int, int]:
    """(tainted checks, of them flagged on fit) of the honest senders' checks after the warm-up, screens left out,
    and the most strikes an honest sender held when a step was settled."""
    tainted = fit = strikes = 0
    if not log_path.exists():
        return 0, 0, 0
    for line in log_path.read_text().splitlines():
        e = json.loads(line)
        if "settled" in e:
            strikes = max([strikes] + [int(v[0]) for w, v in e.get("strikes", {}).items() if w in honest])
            continue
        if e.get("sender") not in honest or e.get("warmup") or e.get("upstream_tainted"):
            continue
        if e.get("tainted"):
            tainted += 1
            fit += "fit" in e.get("reason", "").partition(":")[2].split(",")
    return tainted, fit, strikes


def run(demo_args: list[str], seed: int, variant: list[str], workdir: Path, timeout: float) -> dict:
    report = workdir / "report.json"
    argv = [sys.executable, "-m", "node.cli", "demo", *demo_args, "--sentinel", f"seed={seed}", *variant,
            "--report", str(report), "--workdir", str(workdir / "work"), "--quiet"]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)  # fmt: skip
    if proc.returncode != 0 or not report.exists():
        return {"seed": seed, "error": proc.stdout[-2000:], "seconds": time.monotonic() - start}
    data = json.loads(report.read_text())
    tainted, fit, strikes = honest_checks(workdir / "work" / "logs" / "validator0-checks.jsonl", set(data["honest"]))
    return {"seed": seed, "false_bans": len(data["false_bans"]), "attackers": len(data["malicious"]),
            "caught": len(set(data["malicious"]) & set(data["banned"])), "val_loss": data["val_loss"],
            "honest_tainted": tainted, "honest_fit_flags": fit,
            "honest_strikes": strikes, "seconds": time.monotonic() - start}  # fmt: skip


def table(variants: list[list[str]], results: dict[int, list[dict]], demo_args: str, seeds: list[int]) -> str:
    lines = [f"`sentinel-node demo {demo_args}`, manifest seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} draws)", "",
             "| variant | runs | runs with an honest ban | honest peers banned | attackers banned | honest tainted "
             "checks (mean) | of them on `fit` (all runs) | runs where an honest peer reached 2 strikes | "
             "validation loss (mean) | failed |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, variant in enumerate(variants):
        ok = [r for r in results[i] if "error" not in r]
        failed = len(results[i]) - len(ok)
        if not ok:
            lines.append(f"| `{label(variant)}` | 0 | - | - | - | - | - | - | - | {failed} |")
            continue
        lines.append(
            f"| `{label(variant)}` | {len(ok)} | {sum(r['false_bans'] > 0 for r in ok)} | "
            f"{sum(r['false_bans'] for r in ok)} | {sum(r['caught'] for r in ok)} of "
            f"{sum(r['attackers'] for r in ok)} | {statistics.mean(r['honest_tainted'] for r in ok):.2f} | "
            f"{sum(r['honest_fit_flags'] for r in ok)} | {sum(r['honest_strikes'] >= 2 for r in ok)} | "
            f"{statistics.mean(r['val_loss'] for r in ok):.3f} | {failed} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-args", default=DEMO_TEST, help=f"the demo's arguments (default: {DEMO_TEST!r})")
    p.add_argument("--seeds", default="1-10", help="manifest seeds (projection draws): 1-20, or 0,4,7")
    p.add_argument("--variants", default="[[]]", metavar="JSON",
                   help="a JSON list of variants, each a list of extra demo arguments ([] = the defaults)")
    p.add_argument("--timeout", type=float, default=400.0, help="seconds a demo run may take")
    p.add_argument("--out", default=None, metavar="PATH", help="also write the table (markdown) here")
    p.add_argument("--jsonl", default=None, metavar="PATH", help="also append every run's figures here")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep every run's workdir (keys, logs, report) here")
    args = p.parse_args()
    variants = json.loads(args.variants)
    if not isinstance(variants, list) or not all(isinstance(v, list) for v in variants):
        p.error("--variants must be a JSON list of lists of strings")
    seeds = seeds_of(args.seeds)
    demo_args = shlex.split(args.demo_args)
    results: dict[int, list[dict]] = {i: [] for i in range(len(variants))}
    with tempfile.TemporaryDirectory(prefix="demo-draws-") as tmp:
        base = Path(args.keep) if args.keep else Path(tmp)
        for n, seed in enumerate(seeds, 1):
            for i, variant in enumerate(variants):
                try:
                    res = run(demo_args, seed, variant, base / f"v{i}-s{seed}", args.timeout)
                except subprocess.TimeoutExpired:
                    res = {"seed": seed, "error": "timeout", "seconds": args.timeout}
                res["variant"] = variant
                results[i].append(res)
                if args.jsonl:
                    with open(args.jsonl, "a") as f:
                        f.write(json.dumps(res) + "\n")
                summary = res.get("error", "")[-200:] or (
                    f"honest bans {res['false_bans']}, attackers {res['caught']}/{res['attackers']}, honest tainted "
                    f"{res['honest_tainted']}, on fit {res['honest_fit_flags']}, honest strikes "
                    f"{res['honest_strikes']}, val {res['val_loss']:.3f}")
                print(f"[{n}/{len(seeds)}] seed {seed} {label(variant)}: {summary} "
                      f"({res['seconds']:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    out = table(variants, results, args.demo_args, seeds)
    print(out)
    if args.out:
        Path(args.out).write_text(out + "\n")


if __name__ == "__main__":
    main()
