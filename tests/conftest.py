"""Shared test setup: no DHT or p2pd process may outlive the test session."""

import os

import psutil
import pytest

# torch.cuda.is_available() (in the CUDA tests' skip marks) asks NVML instead of initialising the CUDA driver: a
# forked test's child (pytest-forked) whose parent initialised the driver gets "CUDA error: initialization error"
# from its first CUDA call, and on a GPU machine even a CPU optimizer's step makes one (its graph-capture check)
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


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


def pytest_collection_modifyitems(config, items):
    """Forked tests first (stable order otherwise). A forked child cannot use CUDA once its parent has (torch:
    "Cannot re-initialize CUDA in forked subprocess"), nor run a backward pass once the parent's autograd engine
    has started its device threads, which it does on any machine with a GPU. Run first, the forked tests fork a
    parent that has done neither; on a CPU-only machine the order makes no difference. (pytest-xdist hands tests
    to its workers in its own order: on a GPU machine run the suite without ``-n``.)"""
    items.sort(key=lambda item: item.get_closest_marker("forked") is None)
