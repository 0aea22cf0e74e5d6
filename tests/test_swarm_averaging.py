"""Data-parallel averaging between the replicas of one stage (hivemind DecentralizedAverager over real P2P on
127.0.0.1; forked, bounded)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from swarm_helpers import SEED, LocalSwarm, make_manifest, run_swarm, start_dht

from swarm.identity import Identity
from swarm.stage_server import StageServer, StageServerConfig


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_two_replicas_with_different_parameters_end_up_equal():
    manifest = make_manifest(1)
    ids = [Identity.generate() for _ in range(2)]
    dhts = []
    try:
        dhts.append(start_dht(manifest, ids[0]))
        dhts.append(start_dht(manifest, ids[1], dhts[0].get_visible_maddrs()))

        async def main():
            config = dict(stage=1, seed=SEED, average_every=1, average_matchmaking=1.0, average_timeout=20.0,
                          average_clip=0.0)  # exact averages first; the clip is tested last  # fmt: skip
            servers = [StageServer(StageServerConfig(**config), manifest, identity) for identity in ids]
            try:
                for server, dht in zip(servers, dhts):
                    await server.start(dht)
                with torch.no_grad():
                    for p in servers[1].module.parameters():
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
                before = [[p.detach().clone() for p in s.module.parameters()] for s in servers]
                assert any(not torch.equal(a, b) for a, b in zip(*before))
                applied = await asyncio.gather(*(s.average_now() for s in servers))
                assert applied == [True, True], [s.averaging for s in servers]
                for a, b, pa, pb in zip(servers[0].module.parameters(), servers[1].module.parameters(), *before):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
                    torch.testing.assert_close(a, (pa + pb) / 2, rtol=0, atol=1e-6)
                assert all(s.averaging["rounds"] == 1 and s.averaging["failed"] == 0 for s in servers)

                # a group member that is not (or no longer) an ONLINE, non-banned replica of the stage: here replica 0
                # learns that replica 1 was banned during the round; it discards the result, replica 1 applies it
                with torch.no_grad():
                    for p in servers[1].module.parameters():
                        p.add_(0.05)
                views = iter([{servers[1].peer_id}, set()])

                async def stage_peers():
                    return next(views)

                servers[0]._stage_peers = stage_peers
                before = [[p.detach().clone() for p in s.module.parameters()] for s in servers]
                applied = await asyncio.gather(*(s.average_now() for s in servers))
                assert applied == [False, True] and servers[0].averaging["rejected"] == 1
                for a, pa in zip(servers[0].module.parameters(), before[0]):
                    assert torch.equal(a, pa)  # untouched
                for b, pa, pb in zip(servers[1].module.parameters(), *before):
                    torch.testing.assert_close(b, (pa + pb) / 2, rtol=0, atol=1e-6)

                # a poisoned contribution: replica 1 sends parameters 100x too large. Replica 0, with the clip on,
                # moves each tensor by at most 3 x lr x sqrt(size) (3x what one AdamW step could), towards the group
                del servers[0]._stage_peers  # back to the DHT's view
                servers[0].config.average_clip = 3.0
                with torch.no_grad():
                    for p in servers[1].module.parameters():
                        p.mul_(100.0)
                before = [p.detach().clone() for p in servers[0].module.parameters()]
                applied = await asyncio.gather(*(s.average_now() for s in servers))
                assert applied == [True, True] and servers[0].averaging["clipped"] == 1
                for a, pa in zip(servers[0].module.parameters(), before):
                    moved = float((a - pa).norm())
                    assert 0 < moved <= 3 * servers[0].config.lr * math.sqrt(pa.numel()) * (1 + 1e-4)
            finally:
                for server in servers:
                    await server.shutdown()

        asyncio.run(main())
    finally:
        for dht in reversed(dhts):
            dht.shutdown()


@pytest.mark.forked
@pytest.mark.timeout(120)
def test_replicas_average_in_the_background_while_training():
    """1 stage x 2 replicas averaging every optimizer step: rounds run in the background during training, and a
    replica alone in its stage skips rounds instead of waiting for a group."""
    stage_config = {"average_every": 1, "average_matchmaking": 1.0, "average_timeout": 10.0, "accumulate": 2}
    swarm = LocalSwarm((2,), stage_config=stage_config)

    async def body(swarm: LocalSwarm):
        servers = list(swarm.servers.values())
        for step in range(4):
            await swarm.trainer.step(step)
        assert all(s.optimizer_steps >= 1 for s in servers)
        pending = [s._averaging for s in servers if s._averaging is not None]
        await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 30)
        assert all(s.averaging["rounds"] >= 1 for s in servers), [s.averaging for s in servers]
        assert all(s.averaging["clipped"] == 0 for s in servers), [s.averaging for s in servers]  # honest rounds
        assert swarm.trainer.metrics.step_completed == [4] * 4

    run_swarm(swarm, body)


def test_join_gpu_stage_has_an_average_every_option(tmp_path, capsys):
    from node.cli import main

    base = ["join", "--role", "gpu-stage", "--stage", "1", "--initial-peers", "/ip4/127.0.0.1/tcp/1", "--run-id", "r",
            "--authority", "00" * 32, "--identity", str(tmp_path / "s.key")]  # fmt: skip
    assert main([*base, "--average-every", "-1"]) == 2  # refused before anything starts
    assert "--average-every and --average-clip must be >= 0" in capsys.readouterr().err
    assert main([*base, "--average-clip", "-1"]) == 2
    assert "--average-clip must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["join", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--average-every N" in out and "DecentralizedAverager" in out
