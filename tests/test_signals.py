"""Stopping nodes: Ctrl-C in a terminal (SIGINT) and service managers (SIGTERM) signal a node's whole process group,
hivemind's forked DHT process included. The node must still stop, with status 0, and leave no process behind."""

import contextlib
import json
import os
import signal
import socket
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _bootstrap(tmp_path, port: int = 0):
    """A ``sentinel-node bootstrap`` on ``port`` in its own session, up (its ready file written): (process, log
    path). Whatever of it is left afterwards is killed."""
    ready, log = tmp_path / "ready.json", tmp_path / "bootstrap.log"
    with open(log, "w") as out:
        node = subprocess.Popen([*sentinel_node_command(), "bootstrap", "--port", str(port), "--ready-file",
                                 str(ready)], cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        _wait_for(ready, 90)
        yield node, log
    finally:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
        for c in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                c.kill()


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_a_node_killed_outright_leaves_no_process_behind_and_frees_its_port(tmp_path):
    """SIGKILL (the OOM killer, a crash) gives a node no chance to stop its DHT's process and p2pd: both ran on for
    good, p2pd holding the node's port, so the node could not start again on it ("port ... is in use"). The DHT's
    process now exits once its node is gone, and p2pd with it (its parent-death signal), its socket file removed."""
    port = _free_port()
    with _bootstrap(tmp_path, port) as (node, _):
        children = psutil.Process(node.pid).children(recursive=True)
        daemons = [c for c in children if "p2pd" in c.name()]
        assert len(daemons) == 1, [c.name() for c in children]
        sockets = [a.split("=", 1)[1] for a in daemons[0].cmdline() if a.startswith("-listen=/unix")]
        assert sockets and os.path.exists(sockets[0].removeprefix("/unix")), daemons[0].cmdline()
        os.kill(node.pid, signal.SIGKILL)  # the node alone, as the OOM killer does
        node.wait(10)
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not [c.pid for c in alive if c.status() != psutil.STATUS_ZOMBIE], alive
        assert not os.path.exists(sockets[0].removeprefix("/unix"))
        with socket.socket() as s:  # the port is free again: the node can start on it
            s.bind(("127.0.0.1", port))


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_ctrl_c_to_a_busy_nodes_group_leaves_its_p2pd_to_the_node(tmp_path):
    """Ctrl-C in a terminal signals the node's whole process group. p2pd was in it, and a bootstrap's p2pd closed
    within a second (a joined node's happened to inherit SIGINT ignored), so whatever the node did with the swarm
    after that failed: its DHT could no longer shut down and was killed after its grace period. p2pd now has a
    process group of its own and stops when the node shuts its DHT down. The node is stopped (SIGSTOP) while its
    group gets SIGINT, as a node busy in a long step would be, and resumed 3 s later."""
    with _bootstrap(tmp_path) as (node, log):
        daemons = [c for c in psutil.Process(node.pid).children(recursive=True) if "p2pd" in c.name()]
        assert len(daemons) == 1
        os.kill(node.pid, signal.SIGSTOP)
        os.killpg(node.pid, signal.SIGINT)
        time.sleep(3)
        assert daemons[0].is_running() and daemons[0].status() != psutil.STATUS_ZOMBIE
        os.kill(node.pid, signal.SIGCONT)
        assert node.wait(30) == 0, log.read_text()[-2000:]
        assert "did not shut down within the grace period" not in log.read_text()
        psutil.wait_procs(daemons, timeout=10)
        assert not daemons[0].is_running() or daemons[0].status() == psutil.STATUS_ZOMBIE


def test_a_dht_process_found_dead_just_before_a_stop_signal_is_a_shutdown():
    """A SIGTERM to the node's whole group ends the DHT's process at once (hivemind stops it with SIGTERM, so it
    keeps that default), and the node's check of its DHT may run before its own handler: a DHT process found dead is
    a failure (DHTDied, exit 1) only if no stop signal arrives within a second, as for p2pd."""
    import threading

    from node.common import DHTDied, check_dht

    class DeadDHT:
        exitcode = -signal.SIGTERM

        def is_alive(self) -> bool:
            return False

    stop = StopFlag()
    threading.Timer(0.3, stop.event.set).start()
    check_dht(DeadDHT(), stop)  # the stop came: no error
    with pytest.raises(DHTDied, match="DHT process died"):
        check_dht(DeadDHT(), StopFlag())
