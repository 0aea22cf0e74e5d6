"""A whole swarm in one process on 127.0.0.1, for tests and benchmarks: stage servers, one validator and a trainer,
each on its own hivemind DHT (its own p2pd), wired over real P2P. Not a deployment tool: ``sentinel-node demo`` runs
the same roles as separate processes with the real commands.

    swarm = LocalSwarm((2, 2), preset="tiny")        # 2 stages x 2 replicas
    swarm.start_dhts()                               # blocking: before the event loop
    await swarm.start(); ...; await swarm.stop()     # inside it
    swarm.close()                                    # after it
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from hivemind.dht.routing import DHTID
from hivemind.utils import MSGPackSerializer

from sentinel.attacks import MaliciousBehaviour
from sentinel.config import SentinelConfig
from swarm.data import Corpus
from swarm.dht_schema import (
    SentinelDHT,
    SentinelRecordValidator,
    dht_signing_bytes,
    make_subkey,
    manifest_key,
    pack_signed_value,
    release_p2p_replica,
    stage_key,
)
from swarm.identity import Identity
from swarm.model import resolve_config, split_layers
from swarm.records import Manifest, SignedManifest, StageAnnouncement, StageState
from swarm.stage_server import StageServer, StageServerConfig, rpc_namespace
from swarm.trainer import Trainer, TrainerConfig
from swarm.validator_service import ValidatorService, ValidatorServiceConfig

Slot = tuple[int, int]  # (stage 1..S, replica)


def local_manifest(run_id: str, preset: str, n_stages: int, validator: Identity | list[Identity], trainer: Identity,
                   authority: Identity, ban_quorum: int = 1) -> Manifest:  # fmt: skip
    spans = split_layers(resolve_config(preset, n_stages).n_layers, n_stages)
    validators = validator if isinstance(validator, list) else [validator]
    return Manifest(run_id, preset, n_stages, [tuple(s) for s in spans], {}, [v.public_key for v in validators],
                    [trainer.public_key], ban_quorum, 1.0, authority.public_key)  # fmt: skip


def start_local_dht(
    manifest: Manifest, identity: Identity, initial_peers=(), client_mode: bool = False
) -> SentinelDHT:
    return SentinelDHT(
        initial_peers=list(initial_peers), start=True, startup_timeout=30, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validators=[SentinelRecordValidator.from_manifest(manifest, identity)], client_mode=client_mode,
    )  # fmt: skip


async def flood_stage_key(
    _dht, node, run: str, stage: int, n: int, expiration: float, span: tuple[int, int], batch: int = 2000
) -> int:
    """Red team, run inside a DHT's process (``dht.run_coroutine(partial(flood_stage_key, run=..., ...))``): ``n``
    ONLINE announcements of stage ``stage`` (0-based), each of a peer id nobody serves and self-signed under a fresh
    key, as anyone may publish them, stored through the DHT protocol at every peer this node knows and in its own
    storage. Each receiving node checks every record's signature. Returns how many records the peers accepted."""

    def item(i: int, owner: bytes) -> tuple:
        return StageAnnouncement(run, stage, f"12D3KooWFlood{i:039d}", StageState.ONLINE, span, 1.0, owner).to_tuple()

    return await _flood(node, stage_key(run, stage), item, n, expiration, batch)


async def flood_manifest_key(_dht, node, signed: tuple, n: int, expiration: float, batch: int = 500) -> int:
    """Red team, as ``flood_stage_key``: ``n`` copies of the authority-signed manifest (``signed``: its wire tuple),
    each published under a fresh key as any relay may, under the run's manifest key."""
    run = SignedManifest.from_tuple(signed).manifest.run_id
    return await _flood(node, manifest_key(run), lambda i, owner: signed, n, expiration, batch)


async def _flood(node, key: str, item: Callable[[int, bytes], tuple], n: int, expiration: float, batch: int) -> int:
    key_id = DHTID.generate(source=key)
    subkeys, values = [], []
    for i in range(n):
        identity = Identity.generate()
        payload, subkey = MSGPackSerializer.dumps(item(i, identity.public_key)), make_subkey(identity.public_key)
        signature = identity.sign(dht_signing_bytes(key_id.to_bytes(), MSGPackSerializer.dumps(subkey), payload,
                                                    expiration))  # fmt: skip
        subkeys.append(subkey)
        values.append(pack_signed_value(payload, signature))
        node.protocol.storage.store_subkey(key_id, subkey, values[-1], expiration)
    accepted = 0
    for peer in list(node.protocol.routing_table.peer_id_to_uid):
        for i in range(0, n, batch):
            ok = await node.protocol.call_store(peer, [key_id] * len(values[i:i + batch]), values[i:i + batch],
                                                expiration, subkeys[i:i + batch])  # fmt: skip
            accepted += sum(ok or [])
    return accepted


class LocalSwarm:
    """``replicas[k - 1]`` stage servers for each stage k, one validator (or ``validators`` of them, of which
    ``ban_quorum`` must ban a peer) and a trainer. ``attackers`` maps a slot (stage, replica) to a red-team
    MaliciousBehaviour; ``stallers`` maps a stage to a number of red-team peers that announce a replica of it (each
    under its own key, with its own DHT) and accept every call without ever answering; ``stage_config`` and
    ``validator_config`` hold StageServerConfig and ValidatorServiceConfig overrides. ``validator=False`` leaves the
    validator out of this process: one started elsewhere with ``validator_identity`` (and ``initial_peers()``) serves
    the swarm instead."""

    def __init__(
        self, replicas: tuple[int, ...], *, preset: str = "tiny", run_id: str = "local", seed: int = 0,
        corpus: Corpus | None = None, attackers: dict[Slot, MaliciousBehaviour] | None = None,
        sentinel: SentinelConfig | None = None, trainer_config: TrainerConfig | None = None,
        stage_config: dict | None = None, validator_identity: Identity | None = None,
        trainer_identity: Identity | None = None, validator: bool = True, validators: int = 1, ban_quorum: int = 1,
        validator_config: dict | None = None, stallers: dict[int, int] | None = None,
    ):  # fmt: skip
        self.run_id = run_id
        self.seed = seed
        self.corpus = corpus
        self.validator_identity = validator_identity or Identity.generate()
        self.validator_identities = [self.validator_identity, *(Identity.generate() for _ in range(validators - 1))]
        self.trainer_identity = trainer_identity or Identity.generate()
        self.authority = Identity.generate()
        self.manifest = local_manifest(run_id, preset, len(replicas), self.validator_identities, self.trainer_identity,
                                       self.authority, ban_quorum)  # fmt: skip
        self.signed_manifest = self.manifest.sign(self.authority)
        self.slots: list[Slot] = [(k, r) for k in range(1, len(replicas) + 1) for r in range(replicas[k - 1])]
        self.ids = {slot: Identity.generate() for slot in self.slots}
        self.attackers = attackers or {}
        self.sentinel = sentinel or SentinelConfig()
        self.trainer_config = trainer_config or TrainerConfig(seed=seed, batch_size=2, microbatches=4)
        self.stage_config = dict(stage_config or {})
        self.with_validator = validator
        self.validator_config = validator_config or {}  # ValidatorServiceConfig overrides
        self.dhts: dict = {}
        self.servers: dict[Slot, StageServer] = {}
        self.validator: ValidatorService | None = None  # the first of ``validators``
        self.validators: list[ValidatorService] = []
        self.trainer: Trainer | None = None
        # red team: stage -> how many strangers announce a replica of it that accepts every call and never answers
        self.staller_ids = {(k, i): Identity.generate() for k, n in (stallers or {}).items() for i in range(n)}
        self.stallers: list[StageServer] = []

    def start_dhts(self) -> None:
        """Start every node's DHT (blocking; call it outside the event loop)."""
        nodes = [*((slot, self.ids[slot]) for slot in self.slots),
                 *([("validator", self.validator_identity)] if self.with_validator else []),
                 *((f"validator{i}", identity) for i, identity in enumerate(self.validator_identities[1:], 1)
                   if self.with_validator),
                 *((("staller", *key), identity) for key, identity in self.staller_ids.items()),
                 ("trainer", self.trainer_identity)]  # fmt: skip
        names, identities = zip(*nodes)
        first = start_local_dht(self.manifest, identities[0])
        self.dhts[names[0]] = first
        peers = first.get_visible_maddrs()
        for name, identity in zip(names[1:], identities[1:]):
            self.dhts[name] = start_local_dht(self.manifest, identity, peers)

    async def start(self) -> None:
        for slot in self.slots:
            config = StageServerConfig(stage=slot[0], seed=self.seed, **self.stage_config)
            self.servers[slot] = StageServer(config, self.manifest, self.ids[slot], attack=self.attackers.get(slot))
        if self.with_validator:
            config = ValidatorServiceConfig(**self.validator_config)
            self.validators = [ValidatorService(config, self.manifest, identity, self.sentinel,
                                                signed_manifest=self.signed_manifest)
                               for identity in self.validator_identities]  # fmt: skip
            self.validator = self.validators[0]
        self.trainer = Trainer(self.trainer_config, self.manifest, self.trainer_identity, self.corpus)
        for slot, server in self.servers.items():
            await server.start(self.dhts[slot])
        for i, validator in enumerate(self.validators):
            await validator.start(self.dhts["validator" if i == 0 else f"validator{i}"])
        for key, identity in self.staller_ids.items():
            await self._start_staller(key[0], identity, self.dhts[("staller", *key)])
        await self.trainer.start(self.dhts["trainer"])

    async def _start_staller(self, stage: int, identity: Identity, dht) -> None:
        async def never(kind: str, *args, **kwargs):
            if kind == "forward":
                server.forward_calls += 1  # (counted: how often one was drawn)
            await asyncio.Event().wait()

        config = StageServerConfig(stage=stage, seed=self.seed, sync_on_join=False)
        server = StageServer(config, self.manifest, identity)
        server._serve = never  # every handler, unary or streamed: the call is accepted and never answered
        self.stallers.append(server)
        await server.start(dht)  # (its handlers, its ONLINE announcement and its announcer)

    def initial_peers(self) -> list:
        """Addresses through which a node started elsewhere joins this swarm's DHT (after ``start_dhts``)."""
        return [str(m) for m in next(iter(self.dhts.values())).get_visible_maddrs()]

    async def kill(self, slot: Slot) -> None:
        """Abrupt death of a replica: no OFFLINE announcement (its ONLINE record stays in the DHT until it expires),
        its handlers vanish and its DHT process (with its p2pd) goes down."""
        server = self.servers[slot]
        for task in (server._announcer, server._enlisting):
            if task is not None:
                task.cancel()
        server._announcer = server._enlisting = None
        await server.remove_p2p_handlers(server._p2p, namespace=rpc_namespace(self.run_id))
        server._serving, server._p2p = False, None
        dht = self.dhts.pop(slot)
        await release_p2p_replica(dht)
        await asyncio.to_thread(dht.shutdown)
        await server.shutdown()  # now only stops its averaging task and its compute thread

    async def stop(self) -> None:
        """Shut every node down; one node's failure does not leave the others running (the first error is raised
        once all have been tried)."""
        nodes = [*self.servers.values(), *self.stallers, *self.validators,
                 *([self.trainer] if self.trainer is not None else [])]  # fmt: skip
        errors = []
        for node in nodes:
            try:
                await node.shutdown()
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other nodes
                errors.append(e)
        for dht in self.dhts.values():
            await release_p2p_replica(dht)
        if errors:
            raise errors[0]

    def close(self) -> None:
        for dht in reversed(list(self.dhts.values())):
            dht.shutdown()
        self.dhts.clear()

    def run(
        self, body: Callable[[LocalSwarm], Awaitable[None]], *, after_dhts: Callable[[], None] | None = None
    ) -> None:
        """Start everything, ``await body(self)``, and stop and close everything whatever happens. ``after_dhts`` is
        called (blocking) once the DHTs are up and before the nodes start: e.g. to start a node elsewhere."""
        try:
            self.start_dhts()
            if after_dhts is not None:
                after_dhts()

            async def main():
                try:
                    await self.start()
                    await body(self)
                finally:
                    await self.stop()

            asyncio.run(main())
        finally:
            self.close()
