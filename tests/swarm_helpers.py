"""Shared setup of the in-process loopback swarm tests (``swarm.local.LocalSwarm`` with the tests' run, seed and
corpus)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from swarm.data import Corpus
from swarm.identity import Identity
from swarm.local import LocalSwarm as _LocalSwarm
from swarm.local import local_manifest, start_local_dht

RUN = "resilience-test"
SEED = 5
CORPUS = Corpus(np.random.default_rng(1).integers(0, 256, 20_000).astype(np.uint8), np.zeros(100, np.uint8), "t", 1, 1)
start_dht = start_local_dht


def make_manifest(n_stages: int):
    return local_manifest(RUN, "tiny", n_stages, Identity.generate(), Identity.generate(), Identity.generate())


class LocalSwarm(_LocalSwarm):
    def __init__(self, replicas, **kwargs):
        super().__init__(replicas, run_id=RUN, seed=SEED, corpus=CORPUS, **kwargs)


def run_swarm(swarm: LocalSwarm, body) -> None:
    swarm.run(body)


def sentinel_node_command() -> list[str]:
    """How to run ``sentinel-node`` as a subprocess: this venv's script, else the one on PATH, else the module."""
    script = Path(sys.executable).parent / "sentinel-node"
    if script.exists():
        return [str(script)]
    found = shutil.which("sentinel-node")
    return [found] if found else [sys.executable, "-m", "node.cli"]
