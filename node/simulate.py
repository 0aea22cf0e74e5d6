"""``sentinel-node simulate``: the in-process DP x PP mesh, with optional comparison runs, report and plot."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from node.common import HelpFormatter
from node.report import plot_runs, write_json
from sentinel.attacks import parse_params
from sentinel.config import ALL_METRICS, COMBINE_MODES, SentinelConfig
from swarm.data import load_corpus
from swarm.mesh import TAINT_SCOPES, Mesh, MeshConfig, MeshInterrupted, MeshResult
from swarm.model import PRESETS
from swarm.routing import ROUTINGS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run the in-process DP x PP mesh (attackers, validators, bans) and score the defence",
        description="Simulate S untrusted stages x R replicas in one process, attack them, and score SENTINEL.",
        formatter_class=HelpFormatter,
    )
    d = MeshConfig()
    s = SentinelConfig()
    p.add_argument("--preset", default=d.preset, choices=sorted(PRESETS), help="model size")
    p.add_argument("--stages", type=int, default=d.stages, help="untrusted pipeline stages (may exceed the depth)")
    p.add_argument("--replicas", type=int, default=d.replicas, help="data-parallel replicas per stage")
    p.add_argument("--malicious-fraction", type=float, default=d.malicious_fraction)
    p.add_argument("--attack", default="none", help="group-A name or id (A1..A10), none, or module:function")
    p.add_argument("--attack-params", default="", help="e.g. 'lam=0.5' or 'kappa=0.3,q=0.5' (default: strongest)")
    p.add_argument("--attack-direction", default=d.attack_direction, choices=["forward", "backward", "both"])
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--warmup", type=int, default=d.warmup, help="honest warm-up steps")
    p.add_argument("--onset", type=int, default=None, help="first attacked step (default: end of warm-up)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--defense", choices=["on", "off"], default="on")
    p.add_argument("--compare", action="store_true", help="also run the attack-free and the undefended run")
    p.add_argument("--report", metavar="PATH", help="write the JSON report here")
    p.add_argument("--plot", metavar="PATH", help="write a PNG of losses and the flag/ban timeline here")
    p.add_argument("--microbatches", type=int, default=d.microbatches, help="micro-batches per step")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per micro-batch")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between validation runs (0: end)")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--taint-scope", default=d.taint_scope, choices=TAINT_SCOPES)
    p.add_argument("--routing", default=d.routing, choices=ROUTINGS,
                   help="each micro-batch draws a replica per stage (random, the paper's), or each step's "
                        "micro-batches are shared evenly among a stage's replicas (balanced, as a swarm's trainer)")
    p.add_argument("--validators", type=int, default=d.validators,
                   help="validators, as in a swarm: each keeps its own ledger (see --check-fanout)")
    p.add_argument("--ban-quorum", type=int, default=d.ban_quorum,
                   help="validators that must ban a worker before it is banned and routed around")
    p.add_argument("--check-fanout", type=int, default=d.check_fanout,
                   help="validators that check each tensor (tainted if any flags it); 0: --ban-quorum")
    g = p.add_argument_group("sentinel")
    g.add_argument("--beta-forward", type=float, default=s.beta_forward)
    g.add_argument("--beta-backward", type=float, default=s.beta_backward)
    g.add_argument("--metrics", default=",".join(s.metrics), help=f"comma-separated subset of {ALL_METRICS}")
    g.add_argument("--combine", default=s.combine, choices=list(COMBINE_MODES))
    g.add_argument("--solo-excess-forward", type=float, default=s.solo_excess_forward,
                   help="how far (x its fence) one distance alone must go to flag a forward tensor (1: plain OR)")
    g.add_argument("--solo-excess-backward", type=float, default=s.solo_excess_backward,
                   help="the same for gradients")
    g.add_argument("--token-clip-backward", type=float, default=s.token_clip_backward,
                   help="a gradient's tokens count in its summary with norms capped at this multiple of its median "
                        "token norm (honest gradients are heavy-tailed per token; 0: off)")
    g.add_argument("--fence-k", type=float, default=s.fence_k)
    g.add_argument("--median-baseline", type=int, default=s.median_baseline, metavar="N",
                   help="with N (>= 3) senders at a monitor, the baseline is the median of per-sender EMAs (against "
                        "the fence ratchet; 0: one EMA of all traffic, the paper's)")
    g.add_argument("--fence-upper-spread", type=float, default=s.fence_upper_spread, metavar="X",
                   help="cap each fence's Q3 at the median + X x (median - Q1) (against the fence ratchet; 0: off)")
    g.add_argument("--window", type=int, default=s.window)
    g.add_argument("--ban-level", type=int, default=s.ban_level)
    g.add_argument("--forgive-after", type=int, default=s.forgive_after)
    g.add_argument("--strikes-per-step", type=int, default=s.strikes_per_step,
                   help="at most this many strikes per worker per step (0: one per flag)")
    g.add_argument("--drift-agreement", action=argparse.BooleanOptionalAction, default=s.drift_agreement,
                   help="also call it drift when a majority of a stage's flagged tensors agree with one another, "
                        "however far from a stale baseline (README, \"Drift guard\")")
    g.add_argument("--drift-defer", action=argparse.BooleanOptionalAction, default=s.drift_defer,
                   help="hold mild flags and strike them only if no drift was recognised at their monitor within "
                        "the drift window (fewer honest bans in large meshes, slower bans of mild attackers)")
    g.add_argument("--drift-min-fraction", type=float, default=s.drift_min_fraction,
                   help="drift also needs the flagged tensors to be at least this fraction of those checked at the "
                        "monitor within the drift window (rare outliers are not drift; 0: off)")
    g.add_argument("--drift-active-majority", action=argparse.BooleanOptionalAction, default=s.drift_active_majority,
                   help="call it drift when a majority of the senders still active at the monitor (not banned) "
                        "flag mildly, instead of a majority of all seen there, the banned included")
    g.add_argument("--drift-peer", action=argparse.BooleanOptionalAction, default=s.drift_peer,
                   help="do not strike a mild flag whose tensor is within the fences of another sender's latest "
                        "accepted tensor at the same monitor (it drifted as an honest sibling did; still replaced)")
    g.add_argument("--drift-peer-margin", type=float, default=s.drift_peer_margin, metavar="X",
                   help="--drift-peer forgives a flag only within X of the fences of the sibling's tensor (1: the "
                        "fences themselves)")
    g.add_argument("--small-stage-senders", type=int, default=s.small_stage_senders, metavar="N",
                   help="at a monitor with at most N senders, --drift-peer and the active-majority drift rule apply "
                        "whatever their settings (0: never)")
    g.add_argument("--small-stage-mild-strikes", type=int, default=s.small_stage_mild_strikes, metavar="N",
                   help="at a small stage (--small-stage-senders), a sender's mild flags of one step give it at most "
                        "N strikes; gross flags always strike (0: no cap)")
    g.add_argument("--sibling-alpha", type=float, default=s.sibling_alpha, metavar="P",
                   help="the sibling test: strike a sender whose distances over the fences at a monitor sat, over the "
                        "last --sibling-steps steps, at least --sibling-ratio x its siblings' (median) with a "
                        "one-sided Mann-Whitney p-value below P (0: off)")
    g.add_argument("--sibling-ratio", type=float, default=s.sibling_ratio, metavar="X")
    g.add_argument("--sibling-steps", type=int, default=s.sibling_steps, metavar="N")
    g.add_argument("--sibling-min", type=int, default=s.sibling_min, metavar="N",
                   help="tensors a sender needs within --sibling-steps to take part in the sibling test")
    g.add_argument("--sibling-senders", type=int, default=s.sibling_senders, metavar="N",
                   help="senders taking part that a monitor needs for the sibling test (at least 2)")
    g.add_argument("--input-explains", type=float, default=s.input_explains, metavar="X",
                   help="do not strike a flag whose reference (the stage's input, or the gradient it received) was at "
                        "least X of its own fences from the references seen before, unless the flag goes well beyond "
                        "that (README, \"Input explains\"; still replaced; 0: off)")
    g.add_argument("--learn-tainted", type=float, default=s.learn_tainted, metavar="X",
                   help="learn from a tensor of a micro-batch tainted upstream when it passes the screen, at a "
                        "monitor whose clean checks within the drift window were fewer than X of all (1: at every "
                        "monitor; 0: never; never blamed either way)")
    g.add_argument("--replacement", default=s.replacement, choices=["baseline", "drop"])
    c = p.add_argument_group("checkpoints (with --compare: of the main run only; the comparison runs start over)")
    c.add_argument("--checkpoint", metavar="PATH",
                   help="save the run's whole state here (atomically) every --checkpoint-every steps, at the end and "
                        "on Ctrl-C; refuses to overwrite an existing one without --resume")
    c.add_argument("--checkpoint-every", type=int, default=10, metavar="N", help="steps between checkpoints")
    c.add_argument("--resume", action="store_true",
                   help="continue from --checkpoint if it exists (same settings; --steps may be raised to extend "
                        "the run); the result is the same as an uninterrupted run's")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> MeshConfig:
    sentinel = SentinelConfig(
        beta_forward=args.beta_forward,
        beta_backward=args.beta_backward,
        metrics=tuple(m.strip() for m in args.metrics.split(",") if m.strip()),
        combine=args.combine,
        solo_excess_forward=args.solo_excess_forward,
        solo_excess_backward=args.solo_excess_backward,
        token_clip_backward=args.token_clip_backward,
        median_baseline=args.median_baseline,
        fence_upper_spread=args.fence_upper_spread,
        fence_k=args.fence_k,
        window=args.window,
        min_window=min(SentinelConfig.min_window, args.window),
        ban_level=args.ban_level,
        forgive_after=args.forgive_after,
        strikes_per_step=args.strikes_per_step,
        replacement=args.replacement,
        drift_agreement=args.drift_agreement,
        drift_defer=args.drift_defer,
        drift_min_fraction=args.drift_min_fraction,
        drift_active_majority=args.drift_active_majority,
        drift_peer=args.drift_peer,
        drift_peer_margin=args.drift_peer_margin,
        small_stage_senders=args.small_stage_senders,
        small_stage_mild_strikes=args.small_stage_mild_strikes,
        sibling_alpha=args.sibling_alpha,
        sibling_ratio=args.sibling_ratio,
        sibling_steps=args.sibling_steps,
        sibling_min=args.sibling_min,
        sibling_senders=args.sibling_senders,
        input_explains=args.input_explains,
        learn_tainted=args.learn_tainted,
        seed=args.seed,
    )
    return MeshConfig(
        preset=args.preset,
        stages=args.stages,
        replicas=args.replicas,
        malicious_fraction=args.malicious_fraction,
        attack=args.attack,
        attack_params=parse_params(args.attack_params),
        attack_direction=args.attack_direction,
        steps=args.steps,
        warmup=args.warmup,
        onset=args.onset,
        seed=args.seed,
        defense=args.defense == "on",
        microbatches=args.microbatches,
        batch_size=args.batch_size,
        lr=args.lr,
        eval_every=args.eval_every,
        data=args.data,
        device=args.device,
        taint_scope=args.taint_scope,
        routing=args.routing,
        validators=args.validators,
        ban_quorum=args.ban_quorum,
        check_fanout=args.check_fanout,
        sentinel=sentinel,
    )


def run_one(
    config: MeshConfig,
    label: str,
    corpus,
    quiet: bool,
    checkpoint: str | None = None,
    checkpoint_every: int = 10,
    resume: bool = False,
) -> MeshResult:
    """One run with a progress bar; with ``checkpoint``, saved as it goes and, with ``resume``, continued from it."""
    mesh = Mesh(config, corpus)
    if checkpoint is not None and resume:
        if os.path.exists(checkpoint):
            start = mesh.load_checkpoint(checkpoint)
            print(f"{label}: resumed from {checkpoint} at step {start} of {config.steps}", file=sys.stderr)
        else:
            print(f"{label}: no checkpoint at {checkpoint} yet: starting at step 0", file=sys.stderr)
    bar = tqdm(total=config.steps, initial=mesh.completed_steps, desc=f"{label:>10}", unit="step", disable=quiet,
               file=sys.stderr)

    def progress(step: int, info: dict) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{info['loss']:.3f}", banned=info["banned"])

    try:
        return mesh.run(progress, checkpoint=checkpoint, checkpoint_every=checkpoint_every)
    finally:
        bar.close()


def run(args: argparse.Namespace) -> int:
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    if config.attack != "none" and config.attack_onset >= config.steps:
        print(f"warning: the attack would start at step {config.attack_onset} (--onset, or the end of the warm-up), "
              f"but the last step is {config.steps - 1}: no worker attacks in this run", file=sys.stderr)
    if args.resume and not args.checkpoint:
        raise ValueError("--resume needs --checkpoint PATH")
    if args.checkpoint_every < 1:
        raise ValueError(f"--checkpoint-every must be >= 1, got {args.checkpoint_every}")
    if args.checkpoint and os.path.exists(args.checkpoint) and not args.resume:
        raise ValueError(f"checkpoint {args.checkpoint} exists: pass --resume to continue it, or remove it")
    corpus = load_corpus(config.data)
    main_label = "defended" if config.defense else "undefended"
    try:
        main_run = run_one(config, main_label, corpus, args.quiet, args.checkpoint, args.checkpoint_every, args.resume)
    except MeshInterrupted as e:
        print(f"interrupted after step {e.step} of {config.steps}; checkpoint saved to {e.checkpoint}: rerun with "
              "--resume to continue", file=sys.stderr)
        return 128 + e.signum
    runs: dict[str, MeshResult] = {main_label: main_run}
    if args.compare:
        from dataclasses import replace

        runs["clean"] = run_one(replace(config, attack="none", defense=False), "clean", corpus, args.quiet)
        if config.defense and config.attack != "none":
            runs["undefended"] = run_one(replace(config, defense=False), "undefended", corpus, args.quiet)
    main = runs[main_label]
    report = dict(main.report)
    if "clean" in runs:
        report["val_loss_clean"] = runs["clean"].report["val_loss"]
    if "undefended" in runs:
        report["val_loss_undefended"] = runs["undefended"].report["val_loss"]
    elif main_label == "undefended":
        report["val_loss_undefended"] = main.report["val_loss"]
    report["history"] = {label: r.history for label, r in runs.items()}
    if args.report:
        write_json(args.report, report)
    if args.plot:
        workers = Mesh.worker_ids(config)
        plot_runs(args.plot, runs, workers, main.report["malicious"], config.attack_onset)
    summary = {k: report.get(k) for k in (
        "precision", "recall", "f1", "banned", "false_bans", "time_to_ban", "taint_precision", "taint_recall",
        "val_loss", "val_loss_clean", "val_loss_undefended", "tokens_per_s", "validator_time_fraction",
    ) if k in report}
    print(json.dumps(summary, indent=2, default=str))
    return 0
