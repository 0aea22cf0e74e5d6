"""Stopping nodes: Ctrl-C in a terminal (SIGINT) and service managers (SIGTERM) signal a node's whole process group,
hivemind's forked DHT process included. The node must still stop, with status 0, and leave no process behind."""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from swarm_helpers import sentinel_node_command

from node.common import StopFlag


@pytest.mark.forked
def test_the_stop_flag_acts_only_in_the_process_that_installed_it():
    """In the installer a signal sets the flag; in a forked child (as hivemind forks the DHT's process) SIGTERM
    takes its default action, so that ``Process.terminate`` works, and SIGINT is left to the node."""
    stop = StopFlag().install()
    pid = os.fork()
    if pid == 0:  # the child: SIGINT is ignored, SIGTERM ends it
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        os._exit(3)  # not reached unless SIGTERM failed to end the child
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM, status
    assert not stop.is_set()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.wait(5) and stop.signal == signal.SIGTERM


def _wait_for(path, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists() and path.stat().st_size:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not appear within {seconds} s")


def _stop_group(process: subprocess.Popen, sig: int, seconds: float = 30) -> tuple[int, float]:
    """Signal the process's whole group; its exit status and how long it took."""
    start = time.monotonic()
    os.killpg(process.pid, sig)
    try:
        return process.wait(seconds), time.monotonic() - start
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.forked
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_whole_process_group_stops_bootstrap_and_validator(tmp_path, sig):
    """Before the fix the DHT's process inherited the node's handler and swallowed hivemind's SIGTERM: the node
    waited for it forever. A bootstrap and a validator joined to it, each in its own process group (its own
    terminal, as it were), are signalled group-wide: both exit with status 0 and leave no process behind."""
    node = sentinel_node_command()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*args: str, log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as out:
            return subprocess.Popen([*node, *args], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip

    keys = {}
    for name in ("validator", "trainer"):
        subprocess.run([*node, "keygen", "--out", str(tmp_path / f"{name}.key")], check=True, env=env,
                       capture_output=True, timeout=60)  # fmt: skip
        keys[name] = (tmp_path / f"{name}.key.pub").read_text().split()[0]
    ready = tmp_path / "ready.json"
    bootstrap = run("bootstrap", "--new-swarm", "--run-id", "signals", "--preset", "tiny", "--stages", "2",
                    "--validator-key", keys["validator"], "--trainer-key", keys["trainer"], "--ban-quorum", "1",
                    "--authority-key", str(tmp_path / "authority.key"), "--ready-file", str(ready),
                    log="bootstrap.log")  # fmt: skip
    validator = None
    try:
        _wait_for(ready, 90)
        authority = json.loads(ready.read_text())["authority"]
        validator = run("join", "--role", "validator", "--initial-peers", f"@{ready}", "--run-id", "signals",
                        "--authority", authority, "--identity", str(tmp_path / "validator.key"),
                        "--checkpoint-dir", str(tmp_path / "state"), log="validator.log")  # fmt: skip
        end = time.monotonic() + 90
        while "joined run" not in (tmp_path / "validator.log").read_text():
            assert validator.poll() is None and time.monotonic() < end, (tmp_path / "validator.log").read_text()
            time.sleep(0.2)
        time.sleep(1)
        children = [c.pid for p in (validator, bootstrap) for c in psutil.Process(p.pid).children(recursive=True)]
        for process, log in ((validator, "validator.log"), (bootstrap, "bootstrap.log")):
            status, seconds = _stop_group(process, sig)
            assert status == 0, (tmp_path / log).read_text()[-2000:]
            assert seconds < 20, seconds
        time.sleep(0.5)
        alive = [pid for pid in children if psutil.pid_exists(pid)]
        left = [pid for pid in alive if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        assert not left, left
        assert any((tmp_path / "state").glob("validator-*.pt"))  # the validator saved its state on the way out
    finally:
        for process in (validator, bootstrap):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
