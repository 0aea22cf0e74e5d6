"""The in-process DP x PP mesh: S untrusted stages x R replicas, attackers and validators, in one process.

It runs the same model, data, monitor and attacks as the real swarm, so that detection can be measured at the
paper's scale (100+ workers) on a laptop.

Data parallelism: the replicas of a stage start identical and average every step. Because malicious workers here
attack only the pipeline channel (what they send), not their parameter updates, averaging their parameters is the
same as averaging their gradients; the mesh therefore keeps one parameter copy per stage and accumulates every
replica's gradient into it (an all-reduce), while routing, attacks, blame and bans stay per worker.

Per micro-batch: the trainer embeds the tokens; each untrusted stage ``k`` runs on a random non-banned replica;
its output is checked at forward boundary ``k`` (reference: the stage's input) and passed on, or replaced when
tainted. The trusted head computes the loss. Backward runs in reverse: the gradient stage ``k`` sends for its input
is checked at backward boundary ``k - 1`` (reference: the gradient stage ``k`` received). A stage whose forward
output was replaced is bypassed on the way back (the replacement is its input plus a constant, so the gradient
passes through unchanged) and is neither run nor blamed.

Validators: one by default. With ``validators=N`` each check goes to ``check_fanout`` of them, distinct and at random
(by default the ban quorum, as a swarm's trainer does), and the tensor is tainted if any flags it; each validator
learns and keeps strikes from the traffic it was sent, and a worker is banned, and routed around, once ``ban_quorum``
of them have banned it (the manifest's quorum).

Checkpoints: ``Mesh.run(checkpoint=path)`` writes the whole state (parameters, optimizer, validator, attackers, every
RNG, history, events) every few steps, at the end and on Ctrl-C; ``resume=True`` continues from it, and a resumed
run ends exactly as an uninterrupted one (timings aside). A checkpoint may be resumed with more ``steps``, nothing
else changed.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from sentinel.attacks import MaliciousBehaviour, make_attack, parse_direction
from sentinel.config import SentinelConfig
from sentinel.metrics import precision_recall_f1, taint_scores, time_to_ban
from sentinel.validator import Validator
from swarm.data import BatchSampler, Corpus, load_corpus, validation_batches
from swarm.model import ModelConfig, build_pipeline, resolve_config, resolve_device
from swarm.routing import ROUTINGS, balanced_plan
from swarm.state import save_state_file

TAINT_SCOPES = ("microbatch", "tensor")
CHECKPOINT_FORMAT = "sentinel-mesh-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = frozenset({
    "format", "version", "step", "config", "corpus", "embedding", "stages", "head", "optimizer", "sampler",
    "route_rng", "torch_rng", "cuda_rng", "validator", "behaviours", "history", "events", "poisoned", "tainted",
    "timing",
})


class MeshConfigError(ValueError):
    """An invalid mesh configuration."""


class CheckpointError(ValueError):
    """A mesh checkpoint that cannot be resumed: unreadable, malformed, or made by another configuration or corpus."""


class MeshInterrupted(KeyboardInterrupt):
    """Raised by ``Mesh.run`` for Ctrl-C (SIGINT) or SIGTERM during a checkpointed run, once the step in progress
    finished and the checkpoint was written: ``step`` steps are done and saved in ``checkpoint``."""

    def __init__(self, step: int, checkpoint: str, signum: int):
        super().__init__(f"interrupted by signal {signum} after step {step}; checkpoint: {checkpoint}")
        self.step = step
        self.checkpoint = checkpoint
        self.signum = signum


@dataclass
class MeshConfig:
    """One experiment. Steps are optimizer steps; each step runs ``microbatches`` micro-batches."""

    preset: str = "small"
    stages: int = 8  # untrusted stages
    replicas: int = 4
    malicious_fraction: float = 0.375  # of all untrusted workers, spread evenly over the stages
    attack: str = "none"  # a group-A name or id, "none", or "module:function"
    attack_params: dict = field(default_factory=dict)  # empty: the attack's strongest listed setting
    attack_direction: str = "forward"  # forward | backward | both
    steps: int = 100
    warmup: int = 40  # honest warm-up steps: baselines learn, nothing is flagged on distance
    onset: int | None = None  # first attacked step; default: right after the warm-up
    seed: int = 0
    defense: bool = True
    microbatches: int = 8  # per step
    batch_size: int = 4  # sequences per micro-batch
    lr: float = 1e-3
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_batches: int = 8
    data: str | None = None  # None: the Python standard library's source text
    device: str = "auto"
    taint_scope: str = "microbatch"  # which later checks of a flagged micro-batch skip blame (see module docstring)
    # validators, as in a swarm: each keeps its own monitors and ledger, and a worker is banned (and routed around)
    # once ban_quorum of them have banned it
    validators: int = 1
    ban_quorum: int = 1
    check_fanout: int = 0  # validators (distinct, at random) that check each tensor; tainted if any flags it (0: the
    # ban quorum, as a swarm's trainer does by default)
    routing: str = "random"  # "random": each micro-batch draws a replica per stage uniformly (the paper's
    # stochastic wiring; every mesh figure in README and benchmarks/results was measured so); "balanced": each step's
    # micro-batches are shared evenly among a stage's replicas, as a swarm's trainer does by default (README,
    # "Routing")
    sentinel: SentinelConfig = field(default_factory=SentinelConfig)

    def __post_init__(self) -> None:
        if self.stages < 1 or self.replicas < 1:
            raise MeshConfigError("stages and replicas must be >= 1")
        if not 0.0 <= self.malicious_fraction < 1.0:
            raise MeshConfigError("malicious_fraction must be in [0, 1)")
        if self.steps < 1 or self.warmup < 0 or self.microbatches < 1 or self.batch_size < 1:
            raise MeshConfigError("steps, microbatches and batch_size must be >= 1 and warmup >= 0")
        if self.validators < 1 or not 1 <= self.ban_quorum <= self.validators:
            raise MeshConfigError("validators must be >= 1 and ban_quorum in 1..validators")
        if not 0 <= self.check_fanout <= self.validators:
            raise MeshConfigError("check_fanout must be in 0..validators (0: ban_quorum)")
        if self.taint_scope not in TAINT_SCOPES:
            raise MeshConfigError(f"taint_scope must be one of {TAINT_SCOPES}")
        if self.routing not in ROUTINGS:
            raise MeshConfigError(f"routing must be one of {ROUTINGS}")
        parse_direction(self.attack_direction)

    @property
    def attack_onset(self) -> int:
        return self.warmup if self.onset is None else self.onset

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sentinel"] = self.sentinel.to_dict()
        d["onset"] = self.attack_onset
        return d


def worker_id(stage: int, replica: int) -> str:
    return f"s{stage}r{replica}"


def choose_malicious(stages: int, replicas: int, fraction: float, seed: int) -> list[str]:
    """``round(fraction * stages * replicas)`` workers spread as evenly as possible over the stages.

    Every stage keeps at least one honest replica (a stage with no honest replica cannot be defended by routing).
    """
    rng = np.random.default_rng([seed, 7])
    total = int(round(fraction * stages * replicas))
    per_stage = [total // stages] * stages
    for s in rng.permutation(stages)[: total % stages]:
        per_stage[s] += 1
    chosen = []
    for s in range(stages):
        count = min(per_stage[s], replicas - 1)
        for r in sorted(rng.choice(replicas, size=count, replace=False).tolist()):
            chosen.append(worker_id(s + 1, r))
    return chosen


@dataclass
class Event:
    step: int
    worker: str
    kind: str  # "flag" or "ban"
    boundary: int
    direction: str
    reason: str = ""


@dataclass
class MeshResult:
    report: dict
    history: dict  # per-step series for plots: step, loss, val (step, loss) pairs, banned count
    events: list[Event]


class Mesh:
    def __init__(self, config: MeshConfig, corpus: Corpus | None = None):
        self.config = config
        self.device = resolve_device(config.device)
        self.model_config: ModelConfig = resolve_config(config.preset, config.stages)
        self.corpus = corpus if corpus is not None else load_corpus(config.data)
        torch.manual_seed(config.seed)
        embedding, stages, head = build_pipeline(self.model_config, config.stages, config.seed)
        self.embedding = embedding.to(self.device)
        self.stages = [s.to(self.device) for s in stages]
        self.head = head.to(self.device)
        params = [p for m in (self.embedding, *self.stages, self.head) for p in m.parameters()]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = BatchSampler(self.corpus.train, config.batch_size, self.model_config.seq_len, config.seed)
        self.val_batches = validation_batches(
            self.corpus.val, config.batch_size, self.model_config.seq_len, config.eval_batches
        )
        self.workers = self.worker_ids(config)
        self.malicious: list[str] = []
        self.behaviours: dict[str, MaliciousBehaviour] = {}
        if config.attack != "none":
            self.malicious = choose_malicious(config.stages, config.replicas, config.malicious_fraction, config.seed)
            directions = parse_direction(config.attack_direction)
            for w in self.malicious:
                index = self.workers.index(w)
                attack = make_attack(config.attack, config.attack_params or None, seed=config.seed, worker=index)
                self.behaviours[w] = MaliciousBehaviour(
                    worker=index, attack=attack, directions=directions, onset=config.attack_onset, seed=config.seed
                )
        # drift needs a majority of a stage's replicas to agree (attackers are a minority of every stage)
        sentinel = replace(config.sentinel, drift_senders=max(2, config.replicas // 2 + 1))
        # all on the config's projections, as a swarm's validators on the manifest's seed (--no-private-projections);
        # a swarm's validators now draw their own by default, which quorum.md measured in the mesh as seed + i
        self.validators = [Validator(sentinel) for _ in range(config.validators)] if config.defense else []
        self.route_rng = np.random.default_rng([config.seed, 11])
        self.validator_rng = np.random.default_rng([config.seed, 13])  # which validator checks what (if several)
        self.plan: list[list[int]] | None = None  # balanced routing: the step's replica of each stage per micro-batch
        self.events: list[Event] = []
        self.poisoned: set[int] = set()
        self.tainted: set[int] = set()
        self.stage_seconds = 0.0
        self.validator_seconds = 0.0
        self.n_checks = 0
        self.n_stage_calls = 0
        self.completed_steps = 0  # optimizer steps done; run() continues from here
        self.wall_seconds = 0.0  # time spent in run()'s steps, over every session of a resumed run
        # per-step series; the final evaluation is added to the result's copy only (a checkpoint never holds it)
        self.history: dict[str, list] = {"step": [], "loss": [], "val": [], "banned": []}
        self._corpus_digest: str | None = None

    @staticmethod
    def worker_ids(config: MeshConfig) -> list[str]:
        return [worker_id(s, r) for s in range(1, config.stages + 1) for r in range(config.replicas)]

    # --- routing ----------------------------------------------------------------------------------------------

    @property
    def validator(self) -> Validator | None:
        """The first (with the default ``validators=1``, the only) validator; None without defence."""
        return self.validators[0] if self.validators else None

    def banned(self) -> dict[str, int]:
        """Workers banned by ``ban_quorum`` validators, with the step at which the last of them banned it."""
        if len(self.validators) == 1:
            return self.validators[0].ledger.banned()
        steps: dict[str, list[int]] = {}
        for v in self.validators:
            for worker, step in v.ledger.banned().items():
                steps.setdefault(worker, []).append(step)
        quorum = self.config.ban_quorum
        return {w: sorted(s)[quorum - 1] for w, s in steps.items() if len(s) >= quorum}

    def route(self, index: int) -> list[int]:
        """One replica per stage for the step's micro-batch ``index``: uniformly among the stage's non-banned workers
        (stochastic wiring), or with balanced routing its entry of the step's plan (``plan_step``)."""
        if self.plan is not None:
            return [plan[index % len(plan)] for plan in self.plan]
        return [int(self.route_rng.choice(alive)) for alive in self._alive()]

    def _alive(self) -> list[list[int]]:
        """Each stage's non-banned replicas (all of them where every one is banned: better to route through them than
        to stop training)."""
        banned = self.banned()
        out = []
        for s in range(1, self.config.stages + 1):
            alive = [r for r in range(self.config.replicas) if worker_id(s, r) not in banned]
            out.append(alive or list(range(self.config.replicas)))
        return out

    def plan_step(self) -> None:
        """Balanced routing: share this step's micro-batches evenly among each stage's non-banned replicas (bans
        settle at the end of a step, so the plan holds for the whole step)."""
        if self.config.routing != "balanced":
            self.plan = None
            return
        m = self.config.microbatches
        self.plan = [
            [alive[i] for i in balanced_plan(np.ones(len(alive)), m, self.route_rng)] for alive in self._alive()
        ]

    # --- one micro-batch --------------------------------------------------------------------------------------

    def _send(self, worker: str, tensor: torch.Tensor, step: int, mb: int, direction: str) -> torch.Tensor:
        behaviour = self.behaviours.get(worker)
        if behaviour is None:
            return tensor
        sent = behaviour.apply(tensor, step=step, microbatch=mb, direction=direction)
        if sent is not tensor and not torch.equal(sent, tensor):
            self.poisoned.add(mb)
        return sent

    def _check(
        self, tensor: torch.Tensor, *, boundary: int, direction: str, sender: str, step: int, mb: int,
        reference: torch.Tensor, tainted: bool,
    ) -> tuple[torch.Tensor | None, bool]:
        """Validator check; returns (tensor to pass on or None to drop, flagged)."""
        if not self.validators:
            return tensor, False
        n, fanout = len(self.validators), self.config.check_fanout or self.config.ban_quorum
        if n == 1 or fanout == n:
            chosen = range(n)
        elif fanout == 1:
            chosen = [int(self.validator_rng.integers(n))]
        else:
            chosen = sorted(int(i) for i in self.validator_rng.choice(n, fanout, replace=False))
        out, flagged = tensor, False
        for i in chosen:
            res = self.validators[i].check(
                tensor, boundary=boundary, direction=direction, sender=sender, step=step, reference=reference,
                tainted=tainted and self.config.taint_scope == "microbatch", warmup=step < self.config.warmup,
            )
            self.validator_seconds += res.seconds
            self.n_checks += 1
            if res.tainted:
                if not flagged:  # the first flagging validator's replacement is passed on
                    out, flagged = res.tensor, True
                self.tainted.add(mb)
                if res.blamed:
                    self.events.append(Event(step, sender, "flag", boundary, direction, res.reason))
        return out, flagged

    def _timed(self, fn: Callable[..., torch.Tensor | None], *args) -> torch.Tensor | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stage_seconds += time.perf_counter() - start
        self.n_stage_calls += 1
        return out

    def microbatch(self, step: int, mb: int) -> float | None:
        """Forward and backward of one micro-batch; gradients accumulate. Returns its loss (None if dropped)."""
        cfg = self.config
        x, y = self.sampler.sample()
        x, y = x.to(self.device), y.to(self.device)
        route = self.route(mb % cfg.microbatches)
        emb_out = self.embedding(x)
        h = emb_out.detach().requires_grad_(True)
        tainted = False
        saved: list[tuple[torch.Tensor, torch.Tensor, bool]] = []  # (input, output, replaced) per stage
        for k in range(1, cfg.stages + 1):
            worker = worker_id(k, route[k - 1])
            inp = h
            out = self._timed(self.stages[k - 1], inp)
            sent = self._send(worker, out.detach(), step, mb, "forward")
            checked, flagged = self._check(
                sent, boundary=k, direction="forward", sender=worker, step=step, mb=mb,
                reference=inp.detach(), tainted=tainted,
            )
            if checked is None:  # drop mode: the micro-batch stops here
                return None
            tainted = tainted or flagged
            saved.append((inp, out, flagged))
            h = checked.detach().requires_grad_(True)
        loss = self.head(h, y)
        (loss / cfg.microbatches).backward()
        g = h.grad
        for k in range(cfg.stages, 0, -1):
            inp, out, replaced = saved[k - 1]
            if replaced:  # stage k's output was replaced by (input + constant): the gradient passes straight through
                continue
            worker = worker_id(k, route[k - 1])
            self._timed(torch.autograd.backward, out, g)
            sent = self._send(worker, inp.grad, step, mb, "backward")
            checked, flagged = self._check(
                sent, boundary=k - 1, direction="backward", sender=worker, step=step, mb=mb, reference=g,
                tainted=tainted,
            )
            if checked is None:  # drop mode: upstream stages get nothing from this micro-batch
                return float(loss.detach())
            tainted = tainted or flagged
            g = checked
        emb_out.backward(g)
        return float(loss.detach())

    # --- training ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss of the current model (the honest network; attackers only corrupt traffic)."""
        losses = []
        for x, y in self.val_batches:
            h = self.embedding(x.to(self.device))
            for stage in self.stages:
                h = stage(h)
            losses.append(float(self.head(h, y.to(self.device))))
        return float(np.mean(losses))

    def step(self, step: int) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        self.plan_step()
        losses = []
        for i in range(self.config.microbatches):
            loss = self.microbatch(step, step * self.config.microbatches + i)
            if loss is not None:
                losses.append(loss)
        before = set(self.banned())
        for validator in self.validators:
            validator.end_step(step)
        for worker in sorted(set(self.banned()) - before):
            self.events.append(Event(step, worker, "ban", 0, "", "strikes"))
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.step()
        return float(np.mean(losses)) if losses else math.nan

    def run(
        self,
        progress: Callable[[int, dict], None] | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 10,
        resume: bool = False,
    ) -> MeshResult:
        """Train from ``completed_steps`` (0 for a new mesh) to ``config.steps``, then evaluate and report.

        ``progress(step, {"loss", "banned"})`` is called after every step. With ``checkpoint`` (a file path), the
        state is written there atomically (``save_checkpoint``) every ``checkpoint_every`` steps and at the end, and
        Ctrl-C (SIGINT) or SIGTERM is held until the step in progress ends: the checkpoint is then written and
        :class:`MeshInterrupted` (a ``KeyboardInterrupt``) raised; a second signal interrupts at once, losing the
        steps since the last checkpoint. (Signals are held only in the main thread and only while Python's default
        handlers are installed.) With ``resume`` and an existing ``checkpoint`` file, it is loaded first
        (``load_checkpoint``); a resumed run ends exactly as an uninterrupted one, except for timings.
        """
        cfg = self.config
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if resume and checkpoint is None:
            raise ValueError("resume needs a checkpoint path")
        if resume and checkpoint is not None and os.path.exists(checkpoint):
            self.load_checkpoint(checkpoint)
        with _HeldSignals(enabled=checkpoint is not None) as held:
            while self.completed_steps < cfg.steps:
                step = self.completed_steps
                start = time.perf_counter()
                loss = self.step(step)
                self.history["step"].append(step)
                self.history["loss"].append(loss)
                self.history["banned"].append(len(self.banned()))
                if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                    self.history["val"].append((step + 1, self.evaluate()))
                self.completed_steps = step + 1
                if progress is not None:
                    progress(step, {"loss": loss, "banned": len(self.banned())})
                self.wall_seconds += time.perf_counter() - start
                if checkpoint is not None and held.signum is not None:
                    self.save_checkpoint(checkpoint)
                    raise MeshInterrupted(self.completed_steps, os.fspath(checkpoint), held.signum)
                if checkpoint is not None and self.completed_steps % checkpoint_every == 0:
                    self.save_checkpoint(checkpoint)
            if checkpoint is not None and self.completed_steps % checkpoint_every != 0:
                self.save_checkpoint(checkpoint)
        history = {k: list(v) for k, v in self.history.items()}
        if history["val"] and history["val"][-1][0] == cfg.steps:
            val_loss = history["val"][-1][1]
        else:
            val_loss = self.evaluate()
            history["val"].append((cfg.steps, val_loss))
        return MeshResult(self._report(val_loss, self.wall_seconds), history, list(self.events))

    # --- checkpoints ------------------------------------------------------------------------------------------

    def corpus_digest(self) -> str:
        """SHA-256 of the train and validation bytes: a checkpoint is resumed on the same corpus only."""
        if self._corpus_digest is None:
            h = hashlib.sha256()
            for part in (self.corpus.train, self.corpus.val):
                data = np.ascontiguousarray(part, dtype=np.uint8)
                h.update(len(data).to_bytes(8, "little"))
                h.update(memoryview(data))
            self._corpus_digest = h.hexdigest()
        return self._corpus_digest

    def state_dict(self) -> dict:
        """Everything an exact continuation needs, after ``completed_steps`` steps (call it between steps).

        Plain dicts, lists, tuples, numbers, strings and CPU tensors: loadable with ``torch.load(...,
        weights_only=True)``. Tensors already on CPU are not copied: save it before running more steps."""
        cuda = self.device.type == "cuda"
        return {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "step": self.completed_steps,
            "config": self.config.to_dict(),
            "corpus": {"source": self.corpus.source, "sha256": self.corpus_digest()},
            "embedding": _cpu(self.embedding.state_dict()),
            "stages": [_cpu(stage.state_dict()) for stage in self.stages],
            "head": _cpu(self.head.state_dict()),
            "optimizer": _cpu(self.optimizer.state_dict()),
            "sampler": self.sampler.state_dict(),
            "route_rng": copy.deepcopy(self.route_rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            # one validator's state (the default), or a list of them
            "validator": None if not self.validators else self.validators[0].state_dict()
            if len(self.validators) == 1 else [v.state_dict() for v in self.validators],
            "validator_rng": copy.deepcopy(self.validator_rng.bit_generator.state),
            "behaviours": {w: b.state_dict(with_history=True) for w, b in self.behaviours.items()},
            "history": {k: list(v) for k, v in self.history.items()},
            "events": [asdict(e) for e in self.events],
            "poisoned": sorted(self.poisoned),
            "tainted": sorted(self.tainted),
            "timing": {
                "stage_seconds": self.stage_seconds,
                "validator_seconds": self.validator_seconds,
                "n_checks": self.n_checks,
                "n_stage_calls": self.n_stage_calls,
                "wall_seconds": self.wall_seconds,
            },
        }

    def check_state_dict(self, d: object) -> int:
        """Validate a checkpoint against this mesh without changing anything; returns its step.

        Raises :class:`CheckpointError` for a foreign or malformed file, another format version, a configuration
        that differs in anything but ``steps``, another corpus, or a step beyond ``config.steps``."""
        if not isinstance(d, dict) or d.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError("not a mesh checkpoint (no 'format': 'sentinel-mesh-checkpoint')")
        if d.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint format version {d.get('version')!r}, expected {CHECKPOINT_VERSION}")
        missing = sorted(CHECKPOINT_KEYS - set(d))
        if missing:
            raise CheckpointError(f"malformed checkpoint: missing {missing}")
        if not isinstance(d["config"], dict):
            raise CheckpointError("malformed checkpoint: 'config' is not a dict")
        saved = {"validators": 1, "ban_quorum": 1, "check_fanout": 0, **d["config"]}  # made before these settings
        differences = _config_differences(saved, self.config.to_dict(), ignore=("steps",))
        if differences:
            raise CheckpointError(
                "checkpoint was made with another configuration (only steps may change): " + "; ".join(differences)
            )
        corpus = d["corpus"]
        if not isinstance(corpus, dict) or corpus.get("sha256") != self.corpus_digest():
            source = corpus.get("source") if isinstance(corpus, dict) else None
            raise CheckpointError(f"checkpoint was made on another corpus ({source}), not {self.corpus.source}")
        step = d["step"]
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise CheckpointError(f"malformed checkpoint: step {step!r}")
        if step > self.config.steps:
            raise CheckpointError(f"checkpoint is at step {step}, past this run's {self.config.steps} steps")
        if not isinstance(d["stages"], list) or len(d["stages"]) != len(self.stages):
            raise CheckpointError(f"malformed checkpoint: expected {len(self.stages)} stage states")
        if not isinstance(d["behaviours"], dict) or set(d["behaviours"]) != set(self.behaviours):
            raise CheckpointError("malformed checkpoint: its attackers are not this mesh's")
        if (d["validator"] is None) != (self.validator is None):
            raise CheckpointError("malformed checkpoint: validator state does not match the defence setting")
        if len(self.validators) > 1 and (not isinstance(d["validator"], list)
                                         or len(d["validator"]) != len(self.validators)):  # fmt: skip
            raise CheckpointError(f"malformed checkpoint: expected {len(self.validators)} validator states")
        return step

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict`` (validated first by ``check_state_dict``; see there for the errors).

        A checkpoint that passes validation but then fails to load (damaged inner state) raises CheckpointError
        too; the mesh is then partly restored and must not be used."""
        step = self.check_state_dict(d)
        try:
            self.embedding.load_state_dict(d["embedding"])
            for stage, state in zip(self.stages, d["stages"]):
                stage.load_state_dict(state)
            self.head.load_state_dict(d["head"])
            self.optimizer.load_state_dict(d["optimizer"])
            self.sampler.load_state_dict(d["sampler"])
            self.route_rng.bit_generator.state = copy.deepcopy(d["route_rng"])
            torch.set_rng_state(d["torch_rng"])
            if d["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(d["cuda_rng"], self.device)
            states = d["validator"] if len(self.validators) > 1 else [d["validator"]] * len(self.validators)
            for validator, state in zip(self.validators, states):
                validator.load_state_dict(state)
            if "validator_rng" in d:  # absent from checkpoints made before several validators
                self.validator_rng.bit_generator.state = copy.deepcopy(d["validator_rng"])
            for worker, behaviour in self.behaviours.items():
                behaviour.load_state_dict(d["behaviours"][worker])
            history = d["history"]
            self.history = {k: list(history[k]) for k in ("step", "loss", "val", "banned")}
            self.history["val"] = [(int(s), float(v)) for s, v in self.history["val"]]
            self.events = [Event(**e) for e in d["events"]]
            self.poisoned = {int(mb) for mb in d["poisoned"]}
            self.tainted = {int(mb) for mb in d["tainted"]}
            timing = d["timing"]
            self.stage_seconds = float(timing["stage_seconds"])
            self.validator_seconds = float(timing["validator_seconds"])
            self.n_checks = int(timing["n_checks"])
            self.n_stage_calls = int(timing["n_stage_calls"])
            self.wall_seconds = float(timing["wall_seconds"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"malformed checkpoint: {type(e).__name__}: {e}") from e
        if len(self.history["step"]) != step:
            raise CheckpointError(f"malformed checkpoint: {len(self.history['step'])} steps of history, step {step}")
        self.completed_steps = step

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` to ``path`` atomically (``swarm.state.save_state_file``: a temporary file, synced to
        disk, renamed over ``path``), so that a crash at any moment leaves the previous checkpoint or the new one."""
        save_state_file(self.state_dict(), path)

    def load_checkpoint(self, path: str | os.PathLike) -> int:
        """Load a checkpoint written by ``save_checkpoint`` (``torch.load(..., weights_only=True)``: no code runs).

        Returns the step it continues from. FileNotFoundError if there is none; CheckpointError if it is unreadable,
        malformed, or from another configuration (anything but ``steps``) or corpus."""
        try:
            state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise CheckpointError(f"cannot read checkpoint {os.fspath(path)}: {e}") from e
        self.load_state_dict(state)
        return self.completed_steps

    def _report(self, val_loss: float, wall: float) -> dict:
        cfg = self.config
        banned = self.banned()
        detection = precision_recall_f1(banned, self.malicious)
        tokens = cfg.steps * cfg.microbatches * cfg.batch_size * self.model_config.seq_len
        check_time = self.validator_seconds / self.n_checks if self.n_checks else 0.0
        stage_time = self.stage_seconds / self.n_stage_calls if self.n_stage_calls else 0.0
        honest = [w for w in self.workers if w not in self.malicious]
        return {
            **detection,
            "malicious": sorted(self.malicious),
            "banned": sorted(banned),
            "ban_steps": dict(sorted(banned.items())),
            "false_bans": sorted(w for w in banned if w in honest),
            # with several validators: whom each banned on its own (a quorum of them bans swarm-wide)
            "validator_bans": [sorted(v.ledger.banned()) for v in self.validators] if len(self.validators) > 1 else [],
            "time_to_ban": time_to_ban(banned, self.malicious, cfg.attack_onset),
            **taint_scores(self.tainted, self.poisoned),
            "tainted_microbatches": len(self.tainted),
            "poisoned_microbatches": len(self.poisoned),
            "microbatches": cfg.steps * cfg.microbatches,
            "val_loss": val_loss,
            "tokens_per_s": tokens / wall if wall > 0 else 0.0,
            "wall_s": wall,
            # stage forward and backward calls are timed separately, so one micro-batch's forward+backward at one
            # stage costs 2 * stage_time; a stage's traffic is checked twice (its output and its input gradient)
            "validator_time_fraction": self.validator_seconds / self.stage_seconds if self.stage_seconds else 0.0,
            "validator_check_s": check_time,
            "stage_call_s": stage_time,
            "model": self.model_config.to_dict(),
            "config": cfg.to_dict(),
        }


def _cpu(state: object) -> object:
    """``state`` with every tensor moved to CPU (CPU tensors are kept as they are), for a portable checkpoint."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_cpu(v) for v in state]
    return state


def _config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = (), prefix: str = "") -> list[str]:
    """``"key: saved -> current"`` for every setting that differs (nested dicts compared key by key)."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        if key in ignore:
            continue
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict) and key != "attack_params":
            out += _config_differences(a, b, prefix=f"{prefix}{key}.")
        elif _normalise(a) != _normalise(b):
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _normalise(value: object) -> object:
    """Tuples and lists compare equal (a checkpoint may hold either)."""
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    return value


class _HeldSignals:
    """Holds SIGINT and SIGTERM (records the first in ``signum``) while enabled, in the main thread, where Python's
    default handlers are installed; a second signal of the same kind acts at once (the default handler is back)."""

    SIGNALS = (("SIGINT", signal.default_int_handler), ("SIGTERM", signal.SIG_DFL))

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> _HeldSignals:
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        for name, default in self.SIGNALS:
            signum = getattr(signal, name, None)
            if signum is not None and signal.getsignal(signum) is default:
                self._previous[signum] = signal.signal(signum, self._hold)
        return self

    def _hold(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
        previous = self._previous.pop(signum, None)
        if previous is not None:
            signal.signal(signum, previous)

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()
