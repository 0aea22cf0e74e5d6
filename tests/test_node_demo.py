"""`sentinel-node demo` end to end: a real multi-process swarm on 127.0.0.1 (bootstrap, validator, 2 stage servers of
which one attacks, trainer); the attacker is banned, no honest peer is, and no process survives the demo."""

import json
import math
import signal
import subprocess
import threading
import time

import psutil
import pytest
from swarm_helpers import sentinel_node_command


@pytest.mark.forked
@pytest.mark.timeout(240)
def test_demo_bans_the_attacker_and_leaves_no_process_behind(tmp_path):
    report = tmp_path / "report.json"
    argv = [*sentinel_node_command(), "demo", "--stages", "1", "--replicas", "2", "--steps", "10",
            "--microbatches", "4", "--report", str(report), "--workdir", str(tmp_path / "work"),
            "--timeout", "200"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, psutil.Process] = {}
    done = threading.Event()

    def watch():  # every process the demo starts (its children start their own sessions, p2pd included)
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not done.is_set():
            try:
                for child in root.children(recursive=True):
                    seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            done.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=220)
    finally:
        done.set()
        watcher.join(5)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-4000:]
    data = json.loads(report.read_text())
    for key in ("malicious", "banned", "precision", "recall", "f1", "val_loss", "tokens_per_s", "steps",
                "tainted_microbatches", "rejected_inputs"):  # fmt: skip
        assert key in data, key
    assert len(data["malicious"]) == 1 and len(data["honest"]) == 1
    assert set(data["malicious"]) <= set(data["banned"]), out[-4000:]  # the attacker is banned
    assert not set(data["honest"]) & set(data["banned"]) and data["false_bans"] == []
    assert data["recall"] == 1.0 and data["precision"] == 1.0
    assert math.isfinite(data["val_loss"]) and data["steps"] == 10 and data["tokens_per_s"] > 0
    assert set(data["averaging"]) == {"rounds", "clipped", "left_out", "distrusted"}
    assert data["averaging"]["clipped"] == data["averaging"]["left_out"] == 0
    assert "averaging between honest replicas:" in out
    assert data["tainted_microbatches"] >= 1
    assert "demo summary" in out and "BAN" in out
    # each taint is printed with who sent it and why; the validator's check log has every check and settled step
    bad = data["malicious"][0]
    assert f"forward from {bad}: distance:" in out or f"forward from {bad}: non-finite" in out, out[-4000:]
    log_path = tmp_path / "work" / "logs" / "validator0-checks.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    checks = [e for e in log if "sender" in e]
    assert len(checks) >= 10 * 4 and any(e["tainted"] and e["sender"] == bad for e in checks)
    # every check has a reference (the stage's input, or the gradient it received): its own excess, once warmed
    assert all("input_excess" in e for e in checks) and sum(e["input_excess"] is not None for e in checks) >= 20
    assert any(e.get("strikes", {}).get(bad, [0, False])[1] for e in log if "settled" in e)  # its ban, as settled
    status = data["status"]  # `sentinel-node status --json`, run by the demo against the live swarm
    assert status["banned"] == data["malicious"] and status["manifest"]["n_stages"] == 1
    assert sorted(a["peer"] for a in status["stages"]["1"]) == sorted(data["malicious"] + data["honest"])
    assert any(r["banned"] for r in status["strikes"]) and set(status["validators"]) == {"0", "1"}
    assert len(seen) >= 5  # bootstrap, validator, 2 stage servers, trainer (and their DHT processes and p2pd)
    alive = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:  # clean up before failing, so that no test leaves a process behind either
        p.kill()
    assert not alive, [(p.pid, p.name()) for p in alive]


class Watched:
    """A demo started in the background, with every process it starts remembered (they start their own sessions)."""

    def __init__(self, tmp_path, steps: int = 400):
        self.work = tmp_path / "work"
        self.report = tmp_path / "report.json"
        argv = [*sentinel_node_command(), "demo", "--stages", "1", "--replicas", "2", "--steps", str(steps),
                "--microbatches", "2", "--report", str(self.report), "--workdir", str(self.work),
                "--timeout", "200"]  # fmt: skip
        self.out = (tmp_path / "demo.out").open("w+")
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.STDOUT, text=True)
        self.seen: dict[int, psutil.Process] = {}
        self.done = threading.Event()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    def _watch(self):
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                for child in root.children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            self.done.wait(0.2)

    def wait_for_training(self, timeout: float = 120.0) -> None:
        """Until the trainer has printed a few steps (the whole swarm is up)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            log = self.work / "logs" / "trainer.out"
            if log.exists() and "trainer: step 3/" in log.read_text(errors="replace"):
                return
            time.sleep(0.5)
        raise AssertionError("the demo's trainer did not train 3 steps in time: " + self.text()[-3000:])

    def text(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def alive(self, within: float) -> list[psutil.Process]:
        """The processes the demo started that are still running after up to ``within`` seconds."""
        self.done.set()
        self.watcher.join(5)
        deadline = time.monotonic() + within
        while True:
            alive = [p for p in self.seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.5)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for p in self.alive(0):  # no test leaves a process behind, failing or not
            p.kill()
        self.out.close()


@pytest.mark.forked
@pytest.mark.timeout(240)
def test_demo_interrupted_stops_the_trainer_first_and_summarises_the_run_so_far(tmp_path):
    """Ctrl-C: the trainer stops while the swarm still runs, then the rest; the summary and the report cover the
    steps trained (before, the demo closed everything at once, printed no summary and wrote no report)."""
    demo = Watched(tmp_path)
    try:
        demo.wait_for_training()
        demo.proc.send_signal(signal.SIGINT)
        rc = demo.proc.wait(120)
        out = demo.text()
        assert rc == 130, out[-3000:]
        assert "demo summary (interrupted after step" in out, out[-3000:]
        assert "val loss not measured (stopped early)" in out
        assert "trainer: done:" in out and "no validation (stopped early)" in out
        data = json.loads(demo.report.read_text())
        assert data["interrupted"] is True and 3 <= data["steps"] < 400
        assert data["status"]["manifest"]["n_stages"] == 1  # `status` ran against the swarm, still up
        assert demo.seen and not demo.alive(10), [(p.pid, p.name()) for p in demo.alive(0)]
    finally:
        demo.close()


@pytest.mark.forked
@pytest.mark.timeout(240)
def test_demo_killed_outright_takes_its_swarm_with_it(tmp_path):
    """SIGKILL of the demo (the OOM killer, a crash): every node it started gets its parent-death signal (SIGTERM) and
    stops (before, the whole swarm trained on with nobody to stop it)."""
    demo = Watched(tmp_path)
    try:
        demo.wait_for_training()
        demo.proc.kill()
        demo.proc.wait(10)
        assert len(demo.seen) >= 5  # bootstrap, validator, 2 stage servers, trainer (and their DHTs and p2pd)
        alive = demo.alive(30)
        assert not alive, [(p.pid, p.name(), p.cmdline()[-4:]) for p in alive]
    finally:
        demo.close()
