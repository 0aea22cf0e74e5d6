"""The violation ledger: strikes per worker, forgiveness, bans.

Arithmetic, exactly (``L`` = ban level, ``F`` = forgiveness run, both from ``SentinelConfig``):

* a flagged tensor from worker ``w``: ``strikes[w] += 1``, ``clean[w] = 0``; if ``strikes[w] >= L`` the worker is
  banned at that step (bans are permanent for the run);
* a clean (checked and accepted) tensor: ``clean[w] += 1``; when ``clean[w]`` reaches ``F`` the strikes are wiped
  (``strikes[w] = 0``, ``clean[w] = 0``);
* a tensor that was not checked (warm-up, or a micro-batch already tainted upstream) changes nothing.

So an honest worker with a rare false flag is banned only if ``L`` flags fall within a run of fewer than ``F``
clean tensors between any two of them; an attacker who is flagged on most of its tensors is banned after ``L`` of
its tensors were checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class WorkerRecord:
    strikes: int = 0
    clean: int = 0
    total_strikes: int = 0
    banned: bool = False
    ban_step: int | None = None


class ViolationLedger:
    def __init__(self, ban_level: int, forgive_after: int):
        if ban_level < 1 or forgive_after < 1:
            raise ValueError("ban_level and forgive_after must be >= 1")
        self.ban_level = ban_level
        self.forgive_after = forgive_after
        self.workers: dict[str, WorkerRecord] = {}

    def _get(self, worker: str) -> WorkerRecord:
        rec = self.workers.get(worker)
        if rec is None:
            rec = self.workers[worker] = WorkerRecord()
        return rec

    def record(self, worker: str, flagged: bool, step: int) -> bool:
        """Record one checked tensor from ``worker``. Returns True iff this record banned the worker."""
        rec = self._get(worker)
        if flagged:
            rec.strikes += 1
            rec.total_strikes += 1
            rec.clean = 0
            if not rec.banned and rec.strikes >= self.ban_level:
                rec.banned, rec.ban_step = True, step
                return True
            return False
        rec.clean += 1
        if rec.clean >= self.forgive_after:
            rec.strikes, rec.clean = 0, 0
        return False

    def strikes(self, worker: str) -> int:
        return self._get(worker).strikes

    def is_banned(self, worker: str) -> bool:
        rec = self.workers.get(worker)
        return rec is not None and rec.banned

    def banned(self) -> dict[str, int]:
        """Banned workers and the step each was banned at."""
        return {w: r.ban_step for w, r in self.workers.items() if r.banned}  # type: ignore[misc]

    def state_dict(self) -> dict:
        return {
            "ban_level": self.ban_level,
            "forgive_after": self.forgive_after,
            "workers": {w: asdict(r) for w, r in self.workers.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        self.ban_level = int(d["ban_level"])
        self.forgive_after = int(d["forgive_after"])
        self.workers = {w: WorkerRecord(**r) for w, r in d["workers"].items()}

    def __repr__(self) -> str:
        return f"ViolationLedger(workers={len(self.workers)}, banned={sorted(self.banned())})"
