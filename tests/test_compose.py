"""`bootstrap/docker-compose.yml` without a Docker engine: every service's command, as the file spells it, run as a
process on 127.0.0.1 in the file's dependency order, with the volumes mapped to temporary folders and each node's
`0.0.0.0:31337` to a free loopback port (containers have an address each; processes on one host do not). The trainer
runs 3 steps instead of 200. What this cannot check is the image itself: CI machines have no Docker engine (the
image and the compose swarm were run by hand once; README, "Running a swarm by hand")."""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from swarm_helpers import sentinel_node_command

COMPOSE = Path(__file__).resolve().parents[1] / "bootstrap" / "docker-compose.yml"
CONTAINER_LISTEN = "/ip4/0.0.0.0/tcp/31337"


def _localise(arg: str, keys: Path, data: Path) -> str:
    arg = arg.replace(CONTAINER_LISTEN, "/ip4/127.0.0.1/tcp/0")
    return re.sub(r"(?<![\w.])/(keys|data)(?=/|$)", lambda m: str(keys if m.group(1) == "keys" else data), arg)


def test_compose_file_services_and_order():
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert set(services) == {"keys", "bootstrap", "validator", "stage1", "stage2", "trainer", "status"}
    for name in ("validator", "stage1", "stage2", "trainer", "status"):
        command = services[name]["command"]
        assert command[0] in ("join", "status") and "@/keys/bootstrap.json" in command, name
    assert services["bootstrap"]["depends_on"]["keys"]["condition"] == "service_completed_successfully"
    assert set(services["trainer"]["depends_on"]) == {"validator", "stage1", "stage2"}


@pytest.mark.forked
@pytest.mark.timeout(300)
def test_compose_commands_run_a_swarm_on_loopback(tmp_path):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    keys, data = tmp_path / "keys", tmp_path / "data"
    keys.mkdir()
    data.mkdir()
    path = f"{Path(sentinel_node_command()[0]).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": path}
    logs = tmp_path / "logs"
    logs.mkdir()

    def argv(name: str) -> list[str]:
        command = [_localise(str(a), keys, data) for a in services[name]["command"]]
        if name == "trainer":
            command[command.index("--steps") + 1] = "3"
        return [*sentinel_node_command(), *command]

    # `keys`: the entrypoint is `sh -c` and the script escapes `$` as `$$` for compose
    script = _localise(services["keys"]["command"][0].replace("$$", "$"), keys, data)
    assert services["keys"]["entrypoint"] == ["sh", "-c"]
    subprocess.run(["sh", "-c", script], check=True, env=env, timeout=120, capture_output=True)
    for name in ("validator", "trainer", "stage1", "stage2"):
        assert (keys / f"{name}.key").exists() and (keys / f"{name}.key.pub").exists()
    subprocess.run(["sh", "-c", script], check=True, env=env, timeout=120, capture_output=True)  # idempotent

    procs: dict[str, subprocess.Popen] = {}

    def start(name: str) -> None:
        out = open(logs / f"{name}.log", "w")
        procs[name] = subprocess.Popen(argv(name), stdout=out, stderr=subprocess.STDOUT, env=env,
                                       stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def log(name: str) -> str:
        return (logs / f"{name}.log").read_text()[-3000:]

    try:
        start("bootstrap")
        deadline = time.monotonic() + 90
        while not (keys / "bootstrap.json").exists():
            assert procs["bootstrap"].poll() is None, log("bootstrap")
            assert time.monotonic() < deadline, log("bootstrap")
            time.sleep(0.2)
        for name in ("validator", "stage1", "stage2"):
            start(name)
        trainer = subprocess.run(argv("trainer"), env=env, timeout=240, capture_output=True, text=True)
        assert trainer.returncode == 0, trainer.stdout[-3000:] + trainer.stderr[-3000:]
        metrics = (data / "trainer-metrics.jsonl").read_text().splitlines()
        assert len(metrics) >= 3, metrics
        for name in ("validator", "stage1", "stage2"):
            assert procs[name].poll() is None, log(name)
        # the trainer crashes (SIGKILL, its whole group) in the middle of a later run; restarted, it resumes from its
        # last checkpoint (every 2 steps here: step 4) and redoes the steps after it on stages that applied them once
        # already, under the same step and micro-batch numbers (their replay guard used to refuse those)
        crashed = argv("trainer")
        crashed[crashed.index("--steps") + 1] = "8"
        crashed += ["--checkpoint-every", "2"]
        with open(logs / "trainer-crashed.log", "w") as out:
            doomed = subprocess.Popen(crashed, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 120
        while "step 5/8" not in (logs / "trainer-crashed.log").read_text():
            assert doomed.poll() is None and time.monotonic() < deadline, (logs / "trainer-crashed.log").read_text()
            time.sleep(0.02)
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
        (checkpoint,) = (data / "trainer").glob("trainer-*.pt")
        resumed_at = torch.load(checkpoint, weights_only=False)["step"]
        assert resumed_at in (4, 6), resumed_at
        again = subprocess.run(crashed, env=env, timeout=240, capture_output=True, text=True)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"resumed from {checkpoint}" in again.stdout and "trainer: done: 8 steps" in again.stdout, again.stdout
        status = subprocess.run(argv("status"), env=env, timeout=120, capture_output=True, text=True)
        assert status.returncode == 0, status.stdout[-3000:] + status.stderr[-3000:]
        assert "stage" in status.stdout.lower()
        # a node whose DHT process dies (here stage 2's, killed) notices, saves its state and exits with status 1,
        # so that a supervisor (compose's restart policy) brings it back
        stage2 = procs["stage2"]
        children = psutil.Process(stage2.pid).children()
        dht_process = [c for c in children if any("p2pd" in g.name() for g in c.children())]
        assert len(dht_process) == 1, [(c.name(), [g.name() for g in c.children()]) for c in children]
        for proc in [*dht_process[0].children(recursive=True), *dht_process]:  # its p2pd, then the DHT process
            proc.kill()
        assert stage2.wait(30) == 1, log("stage2")
        # (which death it notices first is a race: the check may run between the two kills)
        assert "DHT process died" in log("stage2") or "p2p daemon (p2pd) died" in log("stage2"), log("stage2")
        (checkpoint,) = (data / "stage2").glob("stage2-*.pt")
        assert torch.load(checkpoint, weights_only=True)["optimizer_steps"] >= 1
        others = {name: proc for name, proc in procs.items() if name != "stage2"}
        for proc in others.values():  # `docker stop`: SIGTERM to the entrypoint only, SIGKILL after the grace period
            proc.send_signal(signal.SIGTERM)
        grace = services["validator"]["stop_grace_period"]
        assert grace == "30s"
        for name, proc in others.items():
            assert proc.wait(30) == 0, log(name)  # a clean exit within the grace period (state saved)
    finally:  # whatever failed: nothing is left behind
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its DHT process and p2pd too, if still there
            except ProcessLookupError:
                pass
            proc.wait(10)
