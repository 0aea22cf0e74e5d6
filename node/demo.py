"""``sentinel-node demo``: a whole swarm on 127.0.0.1, as separate processes started with the real commands.

bootstrap --new-swarm, V validators, S stages x R stage servers (some of them red-team attackers), one trainer. Each
is ``python -m node.cli ...`` in its own process group, with stdout/stderr in ``WORKDIR/logs``; the demo relays their
progress lines, waits for the trainer, stops everyone (SIGTERM, then SIGKILL of the whole group after a timeout) and
scores the bans: the attackers' peer ids against the peers banned by the validators' quorum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from node.common import CommandError, HelpFormatter, parse_overrides, replace_sentinel, say, write_json_atomic
from sentinel.config import SentinelConfig
from swarm.lifetime import die_with_parent
from swarm.model import PRESETS
from swarm.routing import ROUTINGS

STOP_TIMEOUT = 20.0  # seconds a child gets to shut down cleanly before its process group is killed


@dataclass
class Child:
    name: str
    argv: list[str]
    out: Path
    err: Path
    proc: subprocess.Popen | None = None
    stats: Path | None = None
    attacker: bool = False
    files: list = field(default_factory=list)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run a whole swarm on this machine (separate processes, loopback), attackers included",
        description="Start a swarm on 127.0.0.1 with the real commands (bootstrap --new-swarm, validators, stage "
        "servers of which some attack, a trainer), train on the embedded corpus, show progress and detection events, "
        "and summarise attackers against banned peers.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--stages", type=int, default=2, help="untrusted pipeline stages")
    p.add_argument("--replicas", type=int, default=2, help="stage servers per stage")
    p.add_argument("--attackers", type=int, default=1, help="red-team stage servers (a minority of each stage)")
    p.add_argument("--attack", default="zeros", help="the attackers' group-A attack (name, A1..A10, module:function)")
    p.add_argument("--attack-params", default="", help="e.g. 'lam=0.5' (default: the strongest setting)")
    p.add_argument("--attack-direction", default="forward", choices=["forward", "backward", "both"])
    p.add_argument("--attack-averaging", type=float, default=0.0, metavar="X",
                   help="the attackers also serve X times their parameters to their stage's averaging rounds (a "
                        "poisoner the validators cannot see; the honest replicas clip it; 0: off)")
    p.add_argument("--validators", type=int, default=1, help="validator processes (each checks every boundary)")
    p.add_argument("--ban-quorum", type=int, default=1, help="distinct validators that must ban a peer")
    p.add_argument("--check-fanout", type=int, default=0, metavar="K",
                   help="validators that check each tensor at once (the trainer's --check-fanout; 0: --ban-quorum)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=None,
                   help="honest warm-up steps before the attack (default: enough checks for every monitor to learn)")
    p.add_argument("--microbatches", type=int, default=4, help="micro-batches per step")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--ban-level", type=int, default=3, help="strikes that ban a peer")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate of the trainer and the stages")
    p.add_argument("--max-inflight", type=int, default=1,
                   help="micro-batches the trainer keeps in flight (default 1: the demo is reproducible; more is "
                        "faster, but then the order in which the validator learns depends on timing, and on this "
                        "tiny 2 x 2 swarm one run of two with 4 in flight banned 2 honest peers)")
    p.add_argument("--routing", choices=ROUTINGS, default="balanced",
                   help="the trainer's routing of a step's micro-batches over a stage's replicas (join --routing)")
    p.add_argument("--sentinel", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="more sentinel settings for the swarm's manifest, after the demo's own (drift_senders, "
                        "drift_active_majority, drift_peer, ban_level), e.g. seed=7 fit_every=1")
    p.add_argument("--private-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="validators draw their projections from their own keys (the default), or with "
                        "--no-private-projections all from the manifest's seed (join --no-private-projections)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--data", default=None, help="text file or folder (default: the Python standard library)")
    p.add_argument("--report", metavar="PATH", default=None, help="write the JSON summary here")
    p.add_argument("--workdir", default=None, help="keys, logs and state go here (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--quiet", action="store_true", help="only the summary")
    p.set_defaults(func=run)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warmup(args) -> int:
    """Steps for every (boundary, direction) monitor of every validator to see min_window (16) honest tensors."""
    if args.warmup is not None:
        return args.warmup
    # checks per monitor per step: each check goes to check_fanout of the validators, chosen at random
    per_validator = args.microbatches * min(args.check_fanout or args.ban_quorum, args.validators) / args.validators
    return max(3, math.ceil(24 / per_validator))


def _check(args) -> None:
    counts = {"--stages": args.stages, "--replicas": args.replicas, "--steps": args.steps,
              "--validators": args.validators, "--microbatches": args.microbatches, "--batch-size": args.batch_size,
              "--max-inflight": args.max_inflight, "--threads": args.threads}  # fmt: skip
    small = [name for name, value in counts.items() if value < 1]
    if small:
        raise CommandError(f"{', '.join(small)} must be >= 1")
    if args.attackers < 0:
        raise CommandError("--attackers must be >= 0")
    if args.attackers > args.stages * (args.replicas - 1):
        raise CommandError(
            f"--attackers must leave an honest replica in every stage: at most {args.stages * (args.replicas - 1)} "
            f"with {args.stages} stages x {args.replicas} replicas"
        )
    if not math.isfinite(args.attack_averaging):
        raise CommandError("--attack-averaging must be a finite number")
    if not 0 <= args.check_fanout <= args.validators:
        raise CommandError("--check-fanout must be in 0..--validators (0: --ban-quorum)")
    if not 1 <= args.ban_quorum <= args.validators:
        raise CommandError("--ban-quorum must be in 1..--validators")
    replace_sentinel(SentinelConfig(), parse_overrides(args.sentinel))  # a bad setting fails here, not in a child
    if args.attackers:
        from sentinel.attacks import make_attack, parse_params

        make_attack(args.attack, parse_params(args.attack_params) or None)
    _warmup(args)
    if _warmup(args) >= args.steps:
        raise CommandError(f"--steps ({args.steps}) must exceed the warm-up ({_warmup(args)} steps)")


class Swarm:
    """The child processes: started in their own sessions, relayed, stopped with SIGTERM then SIGKILL."""

    def __init__(self, workdir: Path, threads: int, quiet: bool):
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.quiet = quiet
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
        self._stop_relay = threading.Event()
        self._relay: threading.Thread | None = None
        self.descendants: dict[int, psutil.Process] = {}  # every process below a child (DHT, p2pd, shm managers)
        # a child gets SIGTERM (and stops cleanly) if the demo dies without stopping it: SIGKILL, the OOM killer
        self._die_with_demo = die_with_parent(signal.SIGTERM)

    def start(self, name: str, argv: list[str], **kwargs) -> Child:
        child = Child(name, argv, self.logs / f"{name}.out", self.logs / f"{name}.log", **kwargs)
        out, err = child.out.open("wb"), child.err.open("wb")
        child.files = [out, err]
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "node.cli", *argv], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
            env=self.env, start_new_session=True, cwd=self.workdir, preexec_fn=self._die_with_demo,
        )  # fmt: skip
        self.children.append(child)
        return child

    def relay(self) -> None:
        """Echo every child's stdout lines (progress, detection events) and its errors, prefixed by its name."""

        def loop():
            offsets: dict[str, int] = {}
            while True:
                stopping = self._stop_relay.is_set()
                for child in list(self.children):
                    for path, errors in ((child.out, False), (child.err, True)):
                        key = str(path)
                        try:
                            with path.open("rb") as f:
                                f.seek(offsets.get(key, 0))
                                data = f.read()
                        except FileNotFoundError:
                            continue
                        end = data.rfind(b"\n") + 1
                        offsets[key] = offsets.get(key, 0) + end
                        for line in data[:end].decode(errors="replace").splitlines():
                            if errors and not ("ERROR" in line or "Error" in line or "error:" in line):
                                continue
                            if not self.quiet:
                                print(f"[{child.name:>11}] {line}", flush=True)
                if stopping:
                    return
                self.track()
                self._stop_relay.wait(0.3)

        self._relay = threading.Thread(target=loop, name="demo-relay", daemon=True)
        self._relay.start()

    def track(self) -> None:
        """Remember the children's descendants: some (torch_shm_manager) outlive their parent or leave its group."""
        for child in list(self.children):
            try:
                for p in psutil.Process(child.proc.pid).children(recursive=True):
                    self.descendants.setdefault(p.pid, p)
            except psutil.Error:
                continue

    def reap(self, timeout: float = 5.0) -> None:
        """After the children stopped: wait for their descendants to exit, then kill the stragglers."""
        alive = [p for p in self.descendants.values() if p.is_running()]
        _, alive = psutil.wait_procs(alive, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=2)

    def check_alive(self, *children: Child) -> None:
        for child in children:
            if child.proc.poll() is not None:
                tail = child.err.read_text(errors="replace").strip().splitlines()[-5:]
                raise CommandError(f"{child.name} exited early (status {child.proc.returncode}); its log "
                                   f"{child.err} ends with:\n  " + "\n  ".join(tail))  # fmt: skip

    def stop(self, children: list[Child] | None = None, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM each child, wait, then SIGKILL its whole process group (its DHT process and p2pd included)."""
        children = self.children if children is None else children
        self.track()
        for child in children:
            if child.proc is not None and child.proc.poll() is None:
                try:
                    child.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for child in children:
            if child.proc is None:
                continue
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"demo: {child.name} did not stop within {timeout:.0f} s; killing it")
            _kill_group(child.proc.pid)
            try:
                child.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for f in child.files:
                f.close()
            child.files = []

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self._stop_relay.set()
            if self._relay is not None:
                self._relay.join(5)
            self.reap()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_file(path: Path, child: Child, swarm: Swarm, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        swarm.check_alive(child)
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        time.sleep(0.2)
    raise CommandError(f"{child.name} did not come up within {timeout:.0f} s (see {child.err})")


def _status(swarm: Swarm, common: list[str]) -> dict:
    """``sentinel-node status --json`` against the live swarm (what any operator would see); {} if it fails."""
    path = swarm.logs / "status.json"
    with path.open("wb") as out, (swarm.logs / "status.log").open("wb") as err:
        try:
            rc = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", *common], stdout=out,
                                stderr=err, stdin=subprocess.DEVNULL, env=swarm.env, timeout=90).returncode
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        say(f"demo: sentinel-node status failed (see {swarm.logs / 'status.log'})")
        return {}
    state = json.loads(path.read_text())
    say(f"demo: sentinel-node status: {sum(len(v) for v in state['stages'].values())} stage server(s), "
        f"{len(state['strikes'])} strike record(s), banned by quorum: {len(state['banned'])}")
    return state


def run(args: argparse.Namespace) -> int:
    from sentinel.metrics import precision_recall_f1
    from swarm.identity import Identity

    _check(args)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sentinel-demo-")).resolve()
    keys = workdir / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    run_id = f"demo-{int(time.time())}"
    warmup = _warmup(args)

    def identity(name: str) -> Identity:
        path = keys / f"{name}.key"
        if path.exists():
            return Identity.load(path)
        ident = Identity.generate()
        ident.save(path)
        return ident

    validators = [identity(f"validator{i}") for i in range(args.validators)]
    trainer = identity("trainer")
    started = time.monotonic()
    say(f"demo: {args.stages} stages x {args.replicas} replicas, {args.attackers} attacker(s) ({args.attack}, from "
        f"step {warmup}), {args.validators} validator(s), {args.steps} steps of {args.preset}; workdir {workdir}")
    swarm = Swarm(workdir, args.threads, args.quiet)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    interrupted = False  # the first Ctrl-C (or SIGTERM) while the trainer runs ends the run early, with a summary
    try:
        swarm.relay()
        ready_file = workdir / "bootstrap.json"
        ready_file.unlink(missing_ok=True)
        drift = max(2, args.replicas // 2 + 1)  # a majority of a stage's replicas flagged at once is drift
        boot = swarm.start("bootstrap", [
            "bootstrap", "--new-swarm", "--run-id", run_id, "--preset", args.preset, "--stages", str(args.stages),
            "--validator-key", *[v.public_hex for v in validators], "--trainer-key", trainer.public_hex,
            "--ban-quorum", str(args.ban_quorum), "--authority-key", str(keys / "authority.key"),
            "--port", str(_free_port()), "--p2p-identity", str(keys / "bootstrap.p2p"),
            "--sentinel", f"drift_senders={drift}", "drift_active_majority=true", "drift_peer=true",
            f"ban_level={args.ban_level}", *args.sentinel,
            "--ready-file", str(ready_file),
        ])  # fmt: skip
        ready = _wait_file(ready_file, boot, swarm, 90)
        common = ["--initial-peers", *ready["maddrs"], "--run-id", run_id, "--authority", ready["authority"],
                  "--manifest-digest", ready["digest"], "--threads", str(args.threads),
                  "--lr", str(args.lr)]  # fmt: skip
        private = ["--private-projections" if args.private_projections else "--no-private-projections"]
        for i in range(args.validators):
            swarm.start(f"validator{i}", ["join", "--role", "validator", *common, *private, "--identity",
                                          str(keys / f"validator{i}.key"), "--checkpoint-dir", str(workdir / "state"),
                                          "--stats", str(workdir / f"validator{i}.json"),
                                          "--check-log", str(swarm.logs / f"validator{i}-checks.jsonl")])  # fmt: skip
        # attacker i serves stage (i mod S) + 1 as that stage's replica i // S: spread over the stages
        attackers = {(i % args.stages + 1, i // args.stages) for i in range(args.attackers)}
        stages = []
        for k in range(1, args.stages + 1):
            for r in range(args.replicas):
                name = f"stage{k}.{r}"
                argv = ["join", "--role", "gpu-stage", *common, "--identity", str(keys / f"{name}.key"), "--stage",
                        str(k), "--stats", str(workdir / f"{name}.json")]
                bad = (k, r) in attackers
                if bad:
                    argv += ["--attack", args.attack, "--attack-onset", str(warmup), "--attack-direction",
                             args.attack_direction]  # fmt: skip
                    if args.attack_params:
                        argv += ["--attack-params", args.attack_params]
                    if args.attack_averaging:
                        argv += ["--attack-averaging", str(args.attack_averaging)]
                stages.append(swarm.start(name, argv, stats=workdir / f"{name}.json", attacker=bad))
        metrics = workdir / "trainer-metrics.jsonl"
        metrics.unlink(missing_ok=True)
        trainer_stats = workdir / "trainer.json"
        trainer_stats.unlink(missing_ok=True)
        argv = ["join", "--role", "trainer", *common, "--identity", str(keys / "trainer.key"), "--steps",
                str(args.steps), "--microbatches", str(args.microbatches), "--batch-size", str(args.batch_size),
                "--warmup", str(warmup), "--metrics", str(metrics), "--stats", str(trainer_stats),
                "--min-replicas", str(args.replicas), "--max-inflight", str(args.max_inflight),
                "--check-fanout", str(args.check_fanout), "--routing", args.routing]  # fmt: skip
        if args.data:
            argv += ["--data", str(Path(args.data).resolve())]
        tr = swarm.start("trainer", argv)
        deadline = started + args.timeout
        try:
            while tr.proc.poll() is None:
                swarm.check_alive(boot, *stages, *[c for c in swarm.children if c.name.startswith("validator")])
                if time.monotonic() > deadline:
                    raise CommandError(f"the demo did not finish within --timeout {args.timeout:.0f} s")
                time.sleep(0.5)
        except KeyboardInterrupt:  # the trainer first, while the swarm still runs: then the summary of the run so far
            interrupted = True
            say("demo: interrupted; stopping the trainer, then the swarm, for a summary so far (again: stop at once)")
            swarm.stop([tr])
        if interrupted and not trainer_stats.exists():
            raise KeyboardInterrupt  # the trainer left nothing to summarise
        if tr.proc.returncode != 0 or not trainer_stats.exists():
            swarm.check_alive(tr)
        summary = json.loads(trainer_stats.read_text())
        # validators settle the last step's blame and publish their strike records when they stop; then ask the DHT
        swarm.stop([c for c in swarm.children if c.name.startswith("validator")])
        status = _status(swarm, common[: common.index("--manifest-digest")])
        swarm.stop([c for c in swarm.children if c is not boot])  # stage servers write their final stats
        swarm.stop([boot])
    except KeyboardInterrupt:
        say("demo: interrupted; stopping the swarm")
        swarm.close()
        return 130
    finally:
        swarm.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    stage_stats = {c.name: json.loads(c.stats.read_text()) for c in stages if c.stats and c.stats.exists()}
    malicious = sorted(stage_stats[c.name]["peer_id"] for c in stages if c.attacker and c.name in stage_stats)
    honest = sorted(s["peer_id"] for n, s in stage_stats.items() if s["peer_id"] not in malicious)
    # banned by the quorum of validators' signed strike records in the DHT (the trainer's own last view if that failed)
    banned = sorted(status["banned"] if status else summary.get("banned", []))
    report = {
        **precision_recall_f1(banned, malicious),
        "malicious": malicious, "banned": banned, "false_bans": sorted(set(banned) & set(honest)),
        "honest": honest, "val_loss": summary.get("val_loss"), "first_loss": summary.get("first_loss"),
        "train_loss": summary.get("train_loss"), "tokens_per_s": summary.get("tokens_per_s"),
        "steps": summary.get("steps"), "tainted_microbatches": summary.get("tainted_microbatches"),
        "microbatches": summary.get("microbatches"),
        "rejected_inputs": sum(sum(s.get("rejected", {}).values()) for s in stage_stats.values()),
        # parameter averaging as the honest replicas saw it: rounds applied, peers' (tensor) contributions clipped,
        # and left out (too far to clip in), times a peer was left out for being clipped round after round
        "averaging": {key: sum(s.get("averaging", {}).get(key, 0) for s in stage_stats.values()
                               if s["peer_id"] in honest) for key in ("rounds", "clipped", "left_out", "distrusted")},
        "wall_s": time.monotonic() - started, "workdir": str(workdir), "run_id": run_id, "interrupted": interrupted,
        "config": {"stages": args.stages, "replicas": args.replicas, "attackers": args.attackers,
                   "attack": args.attack, "attack_direction": args.attack_direction,
                   "attack_averaging": args.attack_averaging, "validators": args.validators,
                   "ban_quorum": args.ban_quorum, "check_fanout": args.check_fanout or args.ban_quorum,
                   "steps": args.steps, "warmup": warmup,
                   "microbatches": args.microbatches, "batch_size": args.batch_size, "preset": args.preset},
        "stage_servers": stage_stats, "status": status,
    }  # fmt: skip
    if args.report:
        write_json_atomic(args.report, report)
    say("\n=== demo summary" + (f" (interrupted after step {report['steps']} of {args.steps})" if interrupted
                                   else "") + " ===")  # fmt: skip
    say(f"attackers: {[p[:16] + '...' for p in malicious]}")
    say(f"banned:    {[p[:16] + '...' for p in banned]} (false bans: {len(report['false_bans'])})")
    say(f"precision {report['precision']:.2f} recall {report['recall']:.2f} f1 {report['f1']:.2f}; tainted "
        f"micro-batches {_n(report['tainted_microbatches'])} of {_n(report['microbatches'])}; rejected inputs "
        f"{report['rejected_inputs']}")  # fmt: skip
    avg = report["averaging"]
    say(f"averaging between honest replicas: {avg['rounds']} round(s), {avg['clipped']} contribution(s) clipped and "
        f"{avg['left_out']} left out, a peer not heard {avg['distrusted']} time(s)")
    val = "not measured (stopped early)" if interrupted else _n(report["val_loss"], ".3f")
    say(f"loss {_n(report['first_loss'], '.3f')} -> {_n(report['train_loss'], '.3f')}, val loss {val}, "
        f"{_n(report['tokens_per_s'], '.0f')} tokens/s, {report['wall_s']:.0f} s in all; logs in {workdir / 'logs'}")
    return 130 if interrupted else 0


def _n(value, spec: str = "") -> str:
    """A figure of the summary, or n/a where the trainer stopped before it had one."""
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
