"""Shared setup of the in-process loopback swarm tests (``swarm.local.LocalSwarm`` with the tests' run, seed and
corpus)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from swarm.data import BatchSampler, Corpus
from swarm.identity import Identity
from swarm.local import LocalSwarm as _LocalSwarm
from swarm.local import local_manifest, start_local_dht
from swarm.model import build_pipeline
from swarm.stage_server import manifest_model_config

RUN = "resilience-test"
SEED = 5
CORPUS = Corpus(np.random.default_rng(1).integers(0, 256, 20_000).astype(np.uint8), np.zeros(100, np.uint8), "t", 1, 1)
start_dht = start_local_dht


def make_manifest(n_stages: int):
    return local_manifest(RUN, "tiny", n_stages, Identity.generate(), Identity.generate(), Identity.generate())


class LocalSwarm(_LocalSwarm):
    def __init__(self, replicas, **kwargs):
        super().__init__(replicas, run_id=RUN, seed=SEED, corpus=CORPUS, **kwargs)


def local_reference(swarm: LocalSwarm):
    """Loss and gradients of the trainer's first micro-batch, computed in one process on the CPU (the trainer
    backpropagates ``loss / microbatches``): (loss, embedding, stages)."""
    cfg = manifest_model_config(swarm.manifest)
    emb, stages, head = build_pipeline(cfg, swarm.manifest.n_stages, SEED)
    x, y = BatchSampler(CORPUS.train, swarm.trainer_config.batch_size, cfg.seq_len, SEED).sample()
    h = emb(x)
    for stage in stages:
        h = stage(h)
    loss = head(h, y)
    (loss / swarm.trainer_config.microbatches).backward()
    return float(loss), emb, stages


def run_swarm(swarm: LocalSwarm, body) -> None:
    swarm.run(body)


def sentinel_node_command() -> list[str]:
    """How to run ``sentinel-node`` as a subprocess: this venv's script, else the one on PATH, else the module."""
    script = Path(sys.executable).parent / "sentinel-node"
    if script.exists():
        return [str(script)]
    found = shutil.which("sentinel-node")
    return [found] if found else [sys.executable, "-m", "node.cli"]
