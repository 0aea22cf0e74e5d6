"""Shared test setup: no DHT or p2pd process may outlive the test session."""

import psutil
import pytest


@pytest.fixture(autouse=True, scope="session")
def cleanup_children():
    """At session end, terminate (then kill) any child process a test left behind (DHT processes, p2pd daemons)."""
    yield
    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One intra-op thread: CI has 2 cores, and oversubscribed torch threads make tiny models 10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
