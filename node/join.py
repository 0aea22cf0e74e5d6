"""``sentinel-node join --role gpu-stage|validator|trainer``: fetch and verify the manifest, then run the role.

Each role is the existing class (``StageServer``, ``ValidatorService``, ``Trainer``) on this node's own DHT; progress
lines go to stdout; SIGINT/SIGTERM stop the role cleanly (announce OFFLINE, settle and publish strikes, save state).
``--stats PATH`` writes a JSON of the role's counters when it is up and again when it stops (scripts, the demo).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import time
from functools import partial
from pathlib import Path

from node.common import (
    CommandError,
    HelpFormatter,
    StopFlag,
    add_network_args,
    check_dht,
    ensure_identity,
    expand_peers,
    load_manifest_json,
    manifest_json,
    parse_key_hex,
    say,
    sentinel_from_manifest,
    start_dht,
    wait_for_signed_manifest,
    write_json_atomic,
)
from swarm.routing import ROUTINGS

log = logging.getLogger("sentinel.join")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "join",
        help="join a swarm as a gpu-stage, validator or trainer",
        description="Join a swarm: connect to --initial-peers, fetch the manifest of --run-id signed by --authority "
        "from the DHT, verify it, and run the role until SIGINT/SIGTERM (the trainer: until --steps are done).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--role", required=True, choices=["gpu-stage", "validator", "trainer"])
    p.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR",
                   help="bootstrap multiaddrs (or @PATH of a bootstrap --ready-file)")
    p.add_argument("--run-id", required=True)
    p.add_argument("--authority", required=True, metavar="HEX",
                   help="the swarm authority's public key (64 hex, or @PATH of a .pub file or a --ready-file)")
    p.add_argument("--manifest-digest", metavar="HEX", default=None, help="also require this manifest digest")
    p.add_argument("--identity", required=True, metavar="PATH",
                   help="this node's Ed25519 identity (sentinel-node keygen); a gpu-stage creates it if missing")
    p.add_argument("--checkpoint-dir", default=None,
                   help="load/save this node's state here (every role: a stage's weights and optimizer, a "
                        "validator's baselines and strikes, a trainer's checkpoint; the manifest it joined with; its "
                        "libp2p identity)")  # fmt: skip
    p.add_argument("--manifest-timeout", type=float, default=60.0,
                   help="seconds to wait for the manifest in the DHT (at most 15 with a manifest file to fall "
                        "back on)")
    p.add_argument("--manifest", metavar="PATH", default=None,
                   help="the authority's signed manifest file (bootstrap --manifest-out), verified against "
                        "--authority: used when the DHT has none (the authority and every relay down). With "
                        "--checkpoint-dir a node also keeps the manifest it joined with there, for its restarts")
    p.add_argument("--seed", type=int, default=0, help="model init seed (the same on every node of the run)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="auto",
                   help="gpu-stage: auto (CUDA when present, else the CPU), cpu, cuda, cuda:1, ...")  # fmt: skip
    p.add_argument("--stats", metavar="PATH", default=None, help="write the role's counters (JSON) here")
    p.add_argument("--progress-every", type=float, default=10.0, help="seconds between status lines (stage)")
    add_network_args(p, port=0)
    g = p.add_argument_group("gpu-stage")
    g.add_argument("--stage", type=int, default=None, help="which stage to serve, 1..S")
    g.add_argument("--accumulate", type=int, default=0,
                   help="also take an optimizer step after this many backward calls of one trainer step (default 0: "
                        "one step per trainer step, when the trainer's next step arrives; a value below the "
                        "micro-batches this replica gets per step splits each trainer step into several updates)")
    g.add_argument("--average-every", type=int, default=4, metavar="N",
                   help="average parameters with the stage's other replicas every N optimizer steps (a robust pull "
                        "average: each replica fetches its peers' parameters and clips each peer's pull; skipped "
                        "while the stage has no other replica; 0: never)")  # fmt: skip
    g.add_argument("--average-timeout", type=float, default=30.0,
                   help="seconds an averaging round may take before it is abandoned (training goes on)")
    g.add_argument("--average-peers", type=int, default=8, metavar="N",
                   help="hear at most N other replicas, chosen at random, per round")
    g.add_argument("--average-clip", type=float, default=3.0, metavar="X",
                   help="clip each peer's difference from this replica, per parameter tensor, to X times what the "
                        "optimizer steps since this replica's previous round could move it by "
                        "(X * lr * sqrt(size) * steps; 0: no such bound)")  # fmt: skip
    g.add_argument("--average-spread", type=float, default=2.0, metavar="X",
                   help="with two or more peers, also to X times the lower median of the peers' distances, an honest "
                        "replica's under an honest majority (0: no such bound)")  # fmt: skip
    g.add_argument("--average-reject", type=float, default=10.0, metavar="X",
                   help="leave a peer's tensor out of the average, instead of clipping it in, when its difference is "
                        "over X times the --average-clip bound (0: never)")  # fmt: skip
    g.add_argument("--average-distrust", type=int, default=3, metavar="N",
                   help="stop hearing, for 20 rounds, a peer clipped on most of its tensors N rounds running "
                        "(0: never)")  # fmt: skip
    g.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                   help="on start, take the stage's current parameters from its other replicas before serving (the "
                        "element-wise median of 3 or more, the mean of 2 that agree; never one peer's word alone), "
                        "resumed or not; --no-sync: serve this node's own parameters and let averaging catch up")
    g.add_argument("--attack", default=None, metavar="NAME",
                   help="RED-TEAM OPTION FOR TESTING ONLY: corrupt what this stage sends with a group-A attack "
                        "(A1..A10, a name such as zeros, or module:function). Never use it in a real swarm: the "
                        "validators will (and should) ban this node.")  # fmt: skip
    g.add_argument("--attack-params", default="", help="RED-TEAM: e.g. 'lam=0.5' (default: the strongest setting)")
    g.add_argument("--attack-direction", default="forward", choices=["forward", "backward", "both"],
                   help="RED-TEAM: which traffic to corrupt")  # fmt: skip
    g.add_argument("--attack-onset", type=int, default=0, help="RED-TEAM: first attacked step")
    g.add_argument("--attack-averaging", type=float, default=0.0, metavar="X",
                   help="RED-TEAM OPTION FOR TESTING ONLY: serve the stage's other replicas X times this node's "
                        "parameters in their averaging rounds (a poisoner the validators cannot see; 0: honest)")
    g = p.add_argument_group("validator")
    g.add_argument("--boundaries", default="all", help="boundaries to check: 'all' or e.g. '0,1,2'")
    g.add_argument("--private-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="seed the monitors' random projections from this validator's own key (the default), or with "
                        "--no-private-projections from the manifest's seed, which every peer can read (README, "
                        "\"Private projections\")")
    g.add_argument("--check-log", metavar="PATH", default=None,
                   help="append one JSON line per check to PATH: step, micro-batch, boundary, direction, sender, "
                        "every distance and its fence, the verdict, and the strikes of each step settled")  # fmt: skip
    g = p.add_argument_group("trainer")
    g.add_argument("--steps", type=int, default=100,
                   help="optimizer steps of the run (a trainer resumed from its checkpoint continues up to this one)")
    g.add_argument("--microbatches", type=int, default=4, help="micro-batches per step")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per micro-batch")
    g.add_argument("--max-inflight", type=int, default=4,
                   help="micro-batches of a step driven through the swarm at once (pipelining; 1: one at a time)")
    g.add_argument("--routing", choices=ROUTINGS, default="balanced",
                   help="how a step's micro-batches go to a stage's replicas: shared in proportion to throughput "
                        "(balanced), or an independent weighted draw each (random)")
    g.add_argument("--check-fanout", type=int, default=0, metavar="K",
                   help="send each check to K distinct validators at once (tainted if any taints it; default 0: "
                        "the manifest's ban quorum, so that each validator of a quorum sees all the evidence "
                        "instead of a share of it)")
    g.add_argument("--hedge-after", type=float, default=2.0, metavar="SECONDS",
                   help="try a stage forward not answered within this long (or 3x the stage's recent 90th-percentile "
                        "forward latency, if longer) on another replica beside it, and take the first answer: a peer "
                        "that accepts calls and never answers then costs this, not the RPC timeout (0: off)")
    g.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (trainer and gpu-stage)")
    g.add_argument("--warmup", type=int, default=5, help="honest warm-up steps announced to the validators")
    g.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    g.add_argument("--metrics", metavar="PATH", default=None, help="append one JSON line per step here")
    g.add_argument("--eval-batches", type=int, default=4, help="validation batches at the end (0: none)")
    g.add_argument("--checkpoint-every", type=int, default=10, metavar="N",
                   help="with --checkpoint-dir, save the trainer's state every N steps as well as on exit, so that a "
                        "crash loses at most N - 1 steps of it (0: only on exit)")
    g.add_argument("--min-replicas", type=int, default=1, help="wait until every stage has this many replicas")
    g.add_argument("--swarm-timeout", type=float, default=120.0,
                   help="seconds to wait for stages and validators at start, and for a step that finds no route "
                        "(retried every 5 s) before giving up")
    g.add_argument("--taint-scope", default="microbatch", choices=["microbatch", "tensor"],
                   help="later checks of a tainted micro-batch are screens only (microbatch, the paper's rule)")
    p.set_defaults(func=run)


def _check_args(args) -> None:
    if args.role == "gpu-stage" and args.stage is None:
        raise CommandError("--role gpu-stage needs --stage K (1..S)")
    if args.role != "gpu-stage" and (args.stage is not None or args.attack or args.attack_averaging):
        raise CommandError("--stage, --attack and --attack-averaging are gpu-stage options")
    if not math.isfinite(args.attack_averaging):
        raise CommandError("--attack-averaging must be a finite number")
    if args.role == "gpu-stage" and (min(args.average_every, args.average_clip, args.average_spread,
                                         args.average_distrust, args.average_reject) < 0
                                     or not math.isfinite(args.average_reject)
                                     or args.average_timeout <= 2.0):  # fmt: skip
        raise CommandError("--average-every, --average-clip, --average-spread, --average-reject and "
                           "--average-distrust must be >= 0 and --average-timeout > 2 seconds")  # fmt: skip
    if args.role == "gpu-stage" and args.average_peers < 1:
        raise CommandError("--average-peers must be >= 1")
    if args.role == "trainer" and (min(args.steps, args.microbatches, args.batch_size, args.max_inflight) < 1
                                   or min(args.check_fanout, args.checkpoint_every) < 0
                                   or not args.hedge_after >= 0 or not math.isfinite(args.hedge_after)):  # fmt: skip
        raise CommandError("--steps, --microbatches, --batch-size and --max-inflight must be >= 1, --check-fanout, "
                           "--checkpoint-every and --hedge-after >= 0 (--hedge-after: finite)")  # fmt: skip
    if args.role == "gpu-stage":
        from swarm.model import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as e:
            raise CommandError(f"--device: {e}") from None
    if args.manifest and not Path(args.manifest).expanduser().is_file():
        raise CommandError(f"--manifest {args.manifest}: no such file")
    if args.attack:
        from sentinel.attacks import make_attack, parse_params

        make_attack(args.attack, parse_params(args.attack_params) or None)  # fail now, not after joining


def run(args: argparse.Namespace) -> int:
    from swarm.dht_schema import SentinelRecordValidator

    _check_args(args)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    authority = parse_key_hex(args.authority)
    digest = None
    if args.manifest_digest:
        try:
            digest = bytes.fromhex(args.manifest_digest)
        except ValueError:
            raise CommandError("--manifest-digest must be hex") from None
    identity = ensure_identity(args.identity, create=args.role == "gpu-stage")
    stop = StopFlag().install()
    fallbacks = [Path(args.manifest).expanduser()] if args.manifest else []
    saved = _state_path(args, f"manifest-{args.run_id}.json")
    if saved is not None and saved.exists():
        fallbacks.append(saved)
    if args.p2p_identity is None and args.checkpoint_dir:
        # the same peer id after a restart: strikes and bans are per peer id, and a banned replica restarted with a
        # fresh one came back unbanned (its owner key is also banned now: see Trainer.refresh)
        args.p2p_identity = str(_state_path(args, f"p2p-{identity.fingerprint}.id"))
    policy = SentinelRecordValidator.for_bootstrap(args.run_id, authority, identity)
    dht = start_dht(args, expand_peers(args.initial_peers), [policy])
    try:
        signed = _join_manifest(dht, args, authority, digest, fallbacks, stop)
        if saved is not None:
            write_json_atomic(saved, manifest_json(signed))
        args.signed_manifest = signed  # (a validator keeps a copy of it published)
        manifest = signed.manifest
        if args.role == "gpu-stage" and not 1 <= args.stage <= manifest.n_stages:  # before saying "joined"
            raise CommandError(f"--stage must be in 1..{manifest.n_stages} (the manifest's stages)")
        listed = {"validator": manifest.is_validator, "trainer": manifest.is_trainer}.get(args.role)
        if listed is not None and not listed(identity.public_key):
            raise CommandError(f"this identity ({identity.fingerprint}) is not an authorized {args.role} of run "
                               f"{manifest.run_id!r}: the manifest lists the {args.role}s' public keys")  # fmt: skip
        dht.add_validators([SentinelRecordValidator.from_manifest(manifest, identity)])
        say(f"{args.role}: joined run {manifest.run_id!r} ({manifest.preset}, {manifest.n_stages} stages, "
            f"{len(manifest.validators)} validators, ban quorum {manifest.ban_quorum}) as {identity.fingerprint}")
        main = {"gpu-stage": _stage, "validator": _validator, "trainer": _trainer}[args.role]
        return asyncio.run(_releasing(dht, main(args, dht, manifest, identity, stop)))
    finally:
        dht.shutdown()


async def _releasing(dht, role):
    """Run ``role``, then close the DHT's P2P replica it used (``release_p2p_replica``: else its socket file stays)."""
    from swarm.dht_schema import release_p2p_replica

    try:
        return await role
    finally:
        await release_p2p_replica(dht)


def _join_manifest(dht, args, authority: bytes, digest: bytes | None, fallbacks: list[Path], stop: StopFlag):
    """The run's signed manifest: from the DHT (the authority's copy or a relay's), else from the first of
    ``fallbacks`` (``--manifest``, then the one saved in --checkpoint-dir) that is this run's, signed by ``authority``
    and matching ``digest``; with a fallback the DHT gets at most 15 s."""
    timeout = min(args.manifest_timeout, 15.0) if fallbacks else args.manifest_timeout
    try:
        return wait_for_signed_manifest(dht, args.run_id, authority, timeout=timeout, digest=digest, stop=stop)
    except CommandError as missing:
        if stop.is_set() or not fallbacks:
            raise
        problems = []
        for path in fallbacks:
            try:
                signed = load_manifest_json(path, authority)
            except CommandError as e:
                problems.append(str(e))
                continue
            if signed.manifest.run_id != args.run_id or (digest is not None and signed.manifest.digest() != digest):
                problems.append(f"{path} is another manifest (run {signed.manifest.run_id!r}, digest "
                                f"{signed.manifest.digest().hex()[:16]}...)")  # fmt: skip
                continue
            say(f"{args.role}: no manifest in the DHT after {timeout:.0f} s; using {path} (verified)")
            return signed
        raise CommandError(f"{missing}; and no usable manifest file: {'; '.join(problems)}") from None


def _state_path(args, name: str) -> Path | None:
    if not args.checkpoint_dir:
        return None
    folder = Path(args.checkpoint_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


async def _sleep_until_stopped(stop: StopFlag, seconds: float, dht) -> bool:
    """Sleep up to ``seconds``; True if a stop signal arrived. Raises ``DHTDied`` if the node's DHT process stops."""
    end = time.monotonic() + seconds
    while not stop.is_set() and time.monotonic() < end:
        check_dht(dht, stop)
        await asyncio.sleep(min(0.25, max(0.0, end - time.monotonic())))
    return stop.is_set()


# ------------------------------------------------------------------------------------------------------- stage
async def _stage(args, dht, manifest, identity, stop: StopFlag) -> int:
    from sentinel.attacks import MaliciousBehaviour, make_attack, parse_params
    from swarm.stage_server import StageServer, StageServerConfig

    attack = None
    if args.attack:
        params = parse_params(args.attack_params) or None
        behaviour = make_attack(args.attack, params, seed=args.seed, worker=args.stage)
        attack = MaliciousBehaviour(
            worker=args.stage, attack=behaviour, directions=args.attack_direction, onset=args.attack_onset,
            seed=args.seed,
        )
    config = StageServerConfig(
        stage=args.stage, seed=args.seed, accumulate=args.accumulate, device=args.device,
        average_every=args.average_every, average_timeout=args.average_timeout, average_clip=args.average_clip,
        average_spread=args.average_spread, average_peers=args.average_peers, average_distrust=args.average_distrust,
        average_reject=args.average_reject,
        attack_averaging=args.attack_averaging, sync_on_join=args.sync,
        lr=args.lr,
    )  # fmt: skip
    server = StageServer(config, manifest, identity, attack=attack)
    ckpt = _state_path(args, f"stage{args.stage}-{identity.fingerprint}.pt")
    if ckpt is not None and ckpt.exists():
        server.load(ckpt)
        say(f"stage {args.stage}: resumed from {ckpt} ({server.optimizer_steps} optimizer steps)")
    await server.start(dht)
    peer_id = server.peer_id
    if server.sync and server.sync["synced"]:
        say(f"stage {args.stage}: took the stage's parameters on joining: {server.sync['reason']} (largest relative "
            f"change of a tensor {server.sync['change']:.3g})")  # fmt: skip
    elif server.sync and server.sync["peers"]:
        say(f"stage {args.stage}: kept its own parameters on joining: {server.sync['reason']}")

    def stats() -> dict:
        return {"role": "gpu-stage", "stage": args.stage, "peer_id": peer_id, "attack": args.attack,
                "attack_averaging": args.attack_averaging,
                "backward_calls": server.backward_calls, "backward_replays": server.backward_replays,
                "backward_stale": server.backward_stale,
                "optimizer_steps": server.optimizer_steps,
                "rejected": dict(server.rejected), "averaging": dict(server.averaging), "sync": server.sync,
                "fingerprint": identity.fingerprint}  # fmt: skip

    red = f" RED-TEAM attack {args.attack} from step {args.attack_onset}" if attack else ""
    if args.attack_averaging:
        red += f" RED-TEAM: serving its parameters x{args.attack_averaging:g} to averaging peers"
    say(f"stage {args.stage}: serving blocks {server.span[0]}..{server.span[1] - 1} as peer {server.peer_id}{red}")
    if args.stats:
        write_json_atomic(args.stats, stats())
    try:
        last = None
        while not await _sleep_until_stopped(stop, args.progress_every, dht):
            now = (server.backward_calls, sum(server.rejected.values()))
            if now != last:
                say(f"stage {args.stage}: {server.backward_calls} backward, {server.optimizer_steps} optimizer "
                    f"steps, {server.averaging['rounds']} averaging rounds, rejected {dict(server.rejected) or 0}")
                last = now
            if ckpt is not None:
                await server.save_serving(ckpt)
    finally:
        say(f"stage {args.stage}: shutting down")
        await server.shutdown()
        if ckpt is not None:
            server.save(ckpt)
        if args.stats:
            write_json_atomic(args.stats, stats())
    return 0


# --------------------------------------------------------------------------------------------------- validator
def _boundaries(text: str, n_stages: int) -> tuple[int, ...] | None:
    if text.strip().lower() == "all":
        return None
    try:
        out = tuple(sorted({int(b) for b in text.split(",") if b.strip()}))
    except ValueError:
        raise CommandError(f"--boundaries takes 'all' or comma-separated integers, got {text!r}") from None
    if not out or not all(0 <= b <= n_stages for b in out):
        raise CommandError(f"--boundaries must be in 0..{n_stages}")
    return out


async def _validator(args, dht, manifest, identity, stop: StopFlag) -> int:
    from swarm.validator_service import ValidatorService, ValidatorServiceConfig

    state = _state_path(args, f"validator-{identity.fingerprint}.pt")
    config = ValidatorServiceConfig(
        boundaries=_boundaries(args.boundaries, manifest.n_stages), state_path=str(state) if state else None,
        check_log=args.check_log, private_projections=args.private_projections,
    )
    service = ValidatorService(config, manifest, identity, sentinel_from_manifest(manifest),
                               signed_manifest=getattr(args, "signed_manifest", None))  # fmt: skip
    await service.start(dht)
    peer_id = service.peer_id
    say(f"validator: checking boundaries {list(service.boundaries)} as peer {peer_id}")

    def ledger_view() -> tuple[dict[str, int], dict[str, int]]:
        ledger = service.validator.ledger
        for _ in range(3):  # read while the check thread may write: retry on a concurrent resize
            try:
                workers = list(ledger.workers)
                return {w: ledger.strikes(w) for w in workers}, dict(ledger.banned())
            except RuntimeError:
                continue
        return {}, {}

    def stats() -> dict:
        strikes, banned = ledger_view()
        return {"role": "validator", "peer_id": peer_id, "checks": service.n_checks,
                "tainted": service.n_tainted, "strikes": strikes, "banned": banned,
                "probes": dict(service.probes)}  # fmt: skip

    if args.stats:
        write_json_atomic(args.stats, stats())
    tainted, strikes, banned, probed = 0, {}, {}, 0
    try:
        while not await _sleep_until_stopped(stop, 0.5, dht):
            for number, peer, stage, passed in [e for e in list(service.probe_events) if e[0] > probed]:
                say(f"validator: PROBE of {peer} (a new replica of stage {stage + 1}): "
                    + ("passed, listed in this validator's directory" if passed else "failed, not listed"))
                probed = number
            if service.n_tainted > tainted:
                events = [e for e in list(service.taint_events) if e.number > tainted]
                missed = service.n_tainted - tainted - len(events)  # more than the event log holds since last time
                for event in events:
                    say(f"validator: TAINT {event.describe()}")
                if missed > 0:
                    say(f"validator: TAINT {missed} more tensor(s) flagged and replaced")
                say(f"validator: {service.n_tainted} of {service.n_checks} checks tainted so far")
                tainted = service.n_tainted
            now_strikes, now_banned = ledger_view()
            for peer, count in sorted(now_strikes.items()):
                if count > strikes.get(peer, 0) and peer not in now_banned:
                    say(f"validator: STRIKE {peer} now has {count} strike(s)")
            for peer, step in sorted(now_banned.items()):
                if peer not in banned:
                    say(f"validator: BAN {peer} at step {step} (signed strike record published)")
            strikes, banned = now_strikes, now_banned
    finally:
        say("validator: shutting down")
        await service.shutdown()
        if args.stats:
            write_json_atomic(args.stats, stats())
    return 0


# ----------------------------------------------------------------------------------------------------- trainer
async def _wait_for_swarm(trainer, manifest, min_replicas: int, timeout: float, stop: StopFlag) -> None:
    from swarm.records import StageState

    deadline = time.monotonic() + timeout
    while True:
        await trainer.refresh()
        online = {k: sum(a.state == StageState.ONLINE for a in trainer.stages.get(k, []))
                  for k in range(1, manifest.n_stages + 1)}  # fmt: skip
        missing_stages = [k for k, n in online.items() if n < min_replicas]
        missing_boundaries = [b for b in range(manifest.n_stages + 1) if not trainer.validators.get(b)]
        if not missing_stages and not missing_boundaries:
            say(f"trainer: swarm ready: replicas per stage {online}, validators on every boundary")
            return
        if stop.is_set():
            raise CommandError("stopped while waiting for the swarm's stages and validators")
        if time.monotonic() >= deadline:
            raise CommandError(
                f"swarm not ready after {timeout:.0f} s: stages with fewer than {min_replicas} online replica(s): "
                f"{missing_stages}; boundaries without a validator: {missing_boundaries}"
            )
        await asyncio.sleep(1.0)


async def _step_with_retries(trainer, step: int, timeout: float, stop: StopFlag, dht, *, wait: float = 5.0):
    """``trainer.step(step)``, retried while it fails with NoRoute (no replica of some stage answered within a call's
    retry budget: all of them down at once, or announcements of peers that do not answer crowding the honest ones
    out until each has failed and is avoided), every ``wait`` seconds after a fresh DHT view, for up to ``timeout``
    seconds; then CommandError. A failed step puts its batches back (``Trainer.step``), so the retry trains on the
    same data, and stages answer the micro-batches they had already applied without applying them again. None if a
    stop signal arrived while waiting."""
    from swarm.trainer import NoRoute

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await trainer.step(step)
        except NoRoute as e:
            if time.monotonic() + wait > deadline:
                raise CommandError(f"step {step + 1} found no route through the swarm for {timeout:.0f} s "
                                   f"(--swarm-timeout): {e}") from e  # fmt: skip
            say(f"trainer: step {step + 1} failed ({e}); retrying it in {wait:.0f} s")
            if await _sleep_until_stopped(stop, wait, dht):
                return None
            await trainer.refresh()


def _save_trainer_state(trainer, manifest, ckpt: Path, step: int) -> None:
    """Write the trainer's state after ``step`` completed steps, atomically (a temporary file, then a rename)."""
    from swarm.state import save_state_file

    state = {"run_id": manifest.run_id, "step": step, "embedding": trainer.embedding.state_dict(),
             "head": trainer.head.state_dict(), "optimizer": trainer.optimizer.state_dict(),
             "sampler": trainer.sampler.state_dict(), "banned": sorted(trainer.banned),
             "banned_owners": sorted(trainer.banned_owners)}  # fmt: skip
    save_state_file(state, ckpt)


def _load_trainer_state(trainer, manifest, ckpt: Path, state: dict) -> int:
    """Apply a trainer checkpoint (``_trainer`` writes it); the step it continues from."""
    if state["run_id"] != manifest.run_id:
        raise CommandError(f"{ckpt} is a checkpoint of another run")
    trainer.embedding.load_state_dict(state["embedding"])
    trainer.head.load_state_dict(state["head"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.sampler.load_state_dict(state["sampler"])
    # bans are for the whole run (absent from checkpoints before 2026-11-30): a restarted trainer keeps routing
    # around the peers and keys it had seen banned, also those whose records it cannot read any more
    trainer.banned |= set(state.get("banned", ()))
    trainer.banned_owners |= set(state.get("banned_owners", ()))
    return int(state["step"])


async def _trainer(args, dht, manifest, identity, stop: StopFlag) -> int:
    import numpy as np

    from swarm.data import load_corpus, validation_batches
    from swarm.state import load_state_file
    from swarm.trainer import Trainer, TrainerConfig

    corpus = load_corpus(args.data)
    config = TrainerConfig(
        seed=args.seed, batch_size=args.batch_size, microbatches=args.microbatches, lr=args.lr, warmup=args.warmup,
        taint_scope=args.taint_scope, max_inflight=args.max_inflight, check_fanout=args.check_fanout,
        routing=args.routing, hedge_after=args.hedge_after,
    )  # fmt: skip
    trainer = Trainer(config, manifest, identity, corpus)
    start_step = 0
    ckpt = _state_path(args, f"trainer-{identity.fingerprint}.pt")
    if ckpt is not None and ckpt.exists():
        # our own file (the sampler's state holds numpy's RNG state): the full unpickler
        start_step = load_state_file(ckpt, "trainer checkpoint", partial(_load_trainer_state, trainer, manifest, ckpt),
                                     weights_only=False)  # fmt: skip
        say(f"trainer: resumed from {ckpt} at step {start_step}")
    await trainer.start(dht)
    metrics = Path(args.metrics) if args.metrics else None
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
    step = start_step
    wall = 0.0
    summary: dict = {}
    try:
        await _wait_for_swarm(trainer, manifest, args.min_replicas, args.swarm_timeout, stop)
        tokens_per_step = args.microbatches * args.batch_size * trainer.model_config.seq_len
        while step < args.steps and not stop.is_set():
            check_dht(dht, stop)
            t0 = time.perf_counter()
            loss = await _step_with_retries(trainer, step, args.swarm_timeout, stop, dht)
            if loss is None:  # stopped while waiting to retry
                break
            wall += time.perf_counter() - t0
            await trainer.refresh()  # the ban view after this step's strikes
            step += 1
            done = step - start_step
            record = {"step": step - 1, "loss": loss, "tainted": trainer.metrics.tainted,
                      "microbatches": trainer.metrics.microbatches, "retries": trainer.metrics.retries,
                      "hedged": trainer.metrics.hedged, "banned": sorted(trainer.banned),
                      "tokens_per_s": done * tokens_per_step / wall, "time": time.time()}  # fmt: skip
            if metrics is not None:
                with metrics.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            say(f"trainer: step {step}/{args.steps} loss {loss:.4f} tainted {trainer.metrics.tainted} banned "
                f"{len(trainer.banned)} {[p[:12] + '...' for p in sorted(trainer.banned)]} "
                f"{record['tokens_per_s']:.0f} tok/s")  # fmt: skip
            if ckpt is not None and args.checkpoint_every > 0 and step % args.checkpoint_every == 0:
                await asyncio.to_thread(_save_trainer_state, trainer, manifest, ckpt, step)
        val_loss = math.nan
        if args.eval_batches > 0 and not stop.is_set():
            batches = validation_batches(corpus.val, args.batch_size, trainer.model_config.seq_len, args.eval_batches)
            val_loss = await trainer.evaluate(batches, step=step)
            say(f"trainer: validation loss {val_loss:.4f} over {args.eval_batches} batch(es)")
        await trainer.refresh()
        losses = [x for x in trainer.metrics.losses if math.isfinite(x)]
        summary = {
            "role": "trainer", "steps": step, "val_loss": val_loss, "train_loss": losses[-1] if losses else math.nan,
            "first_loss": losses[0] if losses else math.nan,
            "tokens_per_s": (step - start_step) * tokens_per_step / wall if wall > 0 else 0.0,
            "tainted_microbatches": trainer.metrics.tainted, "microbatches": trainer.metrics.microbatches,
            "dropped": trainer.metrics.dropped, "retries": trainer.metrics.retries, "hedged": trainer.metrics.hedged,
            "banned": sorted(trainer.banned),
            "wall_s": wall, "stopped_early": step < args.steps,
            "mean_loss_last": float(np.mean(losses[-3:])) if losses else math.nan,
        }  # fmt: skip
        if metrics is not None:
            with metrics.open("a") as f:
                f.write(json.dumps({"final": True, **summary}) + "\n")
        val = ("no validation (--eval-batches 0)" if args.eval_batches <= 0 else "no validation (stopped early)"
               if stop.is_set() else f"val loss {val_loss:.4f}")  # fmt: skip
        say(f"trainer: done: {step} steps, {val}, banned {len(trainer.banned)}")
    finally:
        await trainer.shutdown()
        if ckpt is not None:
            _save_trainer_state(trainer, manifest, ckpt, step)
        if args.stats:
            write_json_atomic(args.stats, summary or {"role": "trainer", "steps": step, "stopped_early": True})
    return 0
