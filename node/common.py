"""Shared pieces of the networked ``sentinel-node`` commands: the DHT, the manifest, signals, join commands."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import shlex
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

from sentinel.config import SentinelConfig
from swarm.identity import Identity
from swarm.model import resolve_config, split_layers
from swarm.records import Manifest, RecordError, SignedManifest

DEFAULT_PORT = 31337
STARTUP_TIMEOUT = 30.0  # p2pd start (HIVEMIND.md D.1: the 15 s default is the most reported failure)
ROLES = ("gpu-stage", "validator", "trainer")


class CommandError(ValueError):
    """A user-facing error: printed as ``sentinel-node CMD: error: ...`` with exit status 2."""


class DHTDied(RuntimeError):
    """The node's DHT process (with its p2pd) stopped under it: the node can no longer reach the swarm. The role
    shuts down (saving its state) and ``sentinel-node`` exits with status 1, for a supervisor to restart it."""


def check_dht(dht, stop: StopFlag | None = None) -> None:
    """Raise ``DHTDied`` when ``dht``'s process, or the p2p daemon under it, is no longer running. Without p2pd the
    DHT's process lives on, but nothing reaches the node or leaves it: it used to stay up, silent and useless, where
    a supervisor would have restarted it. A SIGTERM to the node's whole process group (a service manager) ends the
    DHT's process at once too, and p2pd with it: with ``stop``, either found dead is a failure only if no stop signal
    arrives within a second (seen in CI: a bootstrap's check ran between a group signal and its own handler, and it
    exited 1; Ctrl-C no longer reaches p2pd, which has a process group of its own)."""
    from swarm.dht_schema import dht_alive

    if not dht_alive(dht):
        if stop is not None and stop.wait(1.0):
            return
        raise DHTDied(f"the DHT process died (exit code {dht.exitcode}); this node stopped (its state is saved) "
                      "and can be restarted with the same command")  # fmt: skip
    if not _p2pd_alive(dht):
        if stop is not None and stop.wait(1.0):
            return
        raise DHTDied("the node's p2p daemon (p2pd) died; this node stopped (its state is saved) and can be "
                      "restarted with the same command")  # fmt: skip


def _p2pd_alive(dht) -> bool:
    """Whether the p2pd process under ``dht``'s process runs (True when it cannot be told: not found yet, no pid)."""
    import psutil

    daemon = getattr(dht, "_sentinel_p2pd", None)
    if daemon is None:
        try:
            children = psutil.Process(dht.pid).children(recursive=True)
        except (psutil.Error, TypeError, ValueError):
            return True
        daemon = next((c for c in children if _is_p2pd(c)), None)
        if daemon is None:
            return True
        dht._sentinel_p2pd = daemon
    try:
        return daemon.is_running() and daemon.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_p2pd(process) -> bool:
    import psutil

    try:
        return process.name().startswith("p2pd")
    except psutil.Error:
        return False


# ------------------------------------------------------------------------------------------------- arguments
def _read_at(text: str) -> str | dict:
    """The content of ``@PATH``: parsed JSON if it is JSON (a bootstrap --ready-file), else the text."""
    path = Path(text[1:]).expanduser()
    try:
        content = path.read_text()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return json.loads(content)
    except json.JSONDecodeError:
        return content


def parse_key_hex(text: str, *, ready_file: bool = True) -> bytes:
    """A 32-byte Ed25519 public key: 64 hex characters (what ``keygen`` prints), or ``@PATH`` of a ``.pub`` file that
    ``keygen`` writes (or of a bootstrap --ready-file, for its authority key: only where ``ready_file``, the
    authority's own options; a validator's or trainer's key read from one silently became the authority's)."""
    if text.startswith("@"):
        content = _read_at(text)
        if isinstance(content, dict) and not ready_file:
            raise CommandError(f"{text[1:]} is a bootstrap ready file, which holds the authority's key: give this "
                               "node's key (its .pub file, or the hex keygen printed)")  # fmt: skip
        text = str(content.get("authority", "")) if isinstance(content, dict) else content
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise CommandError(f"not a hex public key: {text!r:.80}") from None
    if len(key) != 32:
        raise CommandError(f"a public key is 32 bytes (64 hex characters), got {len(key)} bytes: {text!r:.80}")
    return key


def expand_peers(items: Sequence[str]) -> list[str]:
    """--initial-peers: multiaddrs, or ``@PATH`` of a bootstrap --ready-file (JSON) or a text file of multiaddrs."""
    out: list[str] = []
    for item in items:
        if not item.startswith("@"):
            out.append(item)
            continue
        content = _read_at(item)
        found = content.get("maddrs", []) if isinstance(content, dict) else content.split()
        if not found:
            raise CommandError(f"no multiaddrs in {item[1:]}")
        out.extend(str(m) for m in found)
    return out


def host_maddrs(args) -> list[str]:
    """--host-maddrs, or /ip4/127.0.0.1/tcp/PORT (loopback: a public node must say where it listens)."""
    return list(args.host_maddrs) if args.host_maddrs else [f"/ip4/127.0.0.1/tcp/{args.port}"]


def check_ports_free(maddrs: Sequence[str]) -> None:
    """CommandError when a TCP port of ``maddrs`` (``/ip4|ip6/ADDR/tcp/PORT``, PORT > 0) already has a listener.

    p2pd listens with SO_REUSEPORT, so a second node started on a port in use came up "fine" and the kernel split
    incoming connections between the two peers. A probe socket with SO_REUSEADDR (a port in TIME_WAIT after a restart
    is free) but without SO_REUSEPORT cannot bind beside a listener."""
    import socket

    for maddr in maddrs:
        parts = maddr.split("/")
        if len(parts) < 5 or parts[1] not in ("ip4", "ip6") or parts[3] != "tcp" or not parts[4].isdigit():
            continue
        port = int(parts[4])
        if port == 0:
            continue
        family = socket.AF_INET if parts[1] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((parts[2], port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    raise CommandError(f"port {port} of {maddr} is in use (another node on this machine?): choose "
                                       "another --port, or --port 0 for any free one") from None  # fmt: skip
                # an address not on this machine (EADDRNOTAVAIL) and the like: p2pd says what is wrong with it


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, but not where the help already says its default, nor a default of None or
    an empty string ("(default: None)" after "default: the Python standard library" said nothing, twice)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is None or action.default == "":
            return text
        return super()._get_help_string(action)


def add_network_args(p, *, port: int = 0, client_mode_flag: bool = True) -> None:
    g = p.add_argument_group("network")
    g.add_argument("--host-maddrs", nargs="+", metavar="MADDR", default=None,
                   help="multiaddrs to listen on, e.g. /ip4/0.0.0.0/tcp/31337 (default: /ip4/127.0.0.1/tcp/PORT)")
    g.add_argument("--announce-maddrs", nargs="+", metavar="MADDR", default=None,
                   help="public multiaddrs other peers should dial, e.g. /ip4/203.0.113.7/tcp/31337 (behind NAT or "
                        "port forwarding)")  # fmt: skip
    g.add_argument("--port", type=int, default=port, help="TCP port of the default host multiaddr (0: any free port)")
    g.add_argument("--p2p-identity", metavar="PATH", default=None,
                   help="libp2p identity file (RSA, created if missing): a stable peer id and multiaddr across "
                        "restarts (join: by default in --checkpoint-dir when one is given)")  # fmt: skip
    if client_mode_flag:
        g.add_argument("--client-mode", action="store_true", help="serve no DHT requests (a node behind NAT)")
    g.add_argument("--use-auto-relay", action="store_true", help="be reachable through relays (behind NAT)")


def start_dht(args, initial_peers: Sequence[str] = (), record_validators: Sequence = ()):
    """A hivemind DHT with the node's network settings; forked, so call it before any heavy torch work."""
    from swarm.dht_schema import SentinelDHT

    check_ports_free(host_maddrs(args))
    kwargs = dict(
        initial_peers=list(initial_peers), start=True, startup_timeout=STARTUP_TIMEOUT,
        host_maddrs=host_maddrs(args), record_validators=list(record_validators),
    )  # fmt: skip
    if args.announce_maddrs:
        kwargs["announce_maddrs"] = list(args.announce_maddrs)
    if args.p2p_identity:
        Path(args.p2p_identity).parent.mkdir(parents=True, exist_ok=True)
        kwargs["identity_path"] = args.p2p_identity
    if getattr(args, "client_mode", False):
        kwargs["client_mode"] = True
    if getattr(args, "use_auto_relay", False):
        kwargs["use_auto_relay"] = True
    try:
        return SentinelDHT(**kwargs)
    except Exception as e:
        raise CommandError(
            f"could not start the DHT ({type(e).__name__}: {e}). Check --initial-peers (is the bootstrap peer up and "
            f"reachable?), --host-maddrs (is the port free?) and that this machine's clock is within 3 s of the others"
        ) from None


def visible_maddrs(dht) -> list[str]:
    return [str(m) for m in dht.get_visible_maddrs()]


# ------------------------------------------------------------------------------------------------- manifest
def sentinel_to_config(sentinel: SentinelConfig) -> dict:
    """SentinelConfig as a manifest ``sentinel_config`` (flat float/int/str/bool; metrics comma-joined)."""
    d = sentinel.to_dict()
    d["metrics"] = ",".join(sentinel.metrics)
    return d


def sentinel_from_manifest(manifest: Manifest) -> SentinelConfig:
    d = dict(manifest.sentinel_config)
    if isinstance(d.get("metrics"), str):
        d["metrics"] = tuple(m for m in d["metrics"].split(",") if m)
    return SentinelConfig.from_dict(d)


def parse_overrides(items: Sequence[str]) -> dict:
    """``KEY=VALUE`` sentinel settings: ints, floats, booleans or strings, checked by SentinelConfig."""
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--sentinel takes KEY=VALUE, got {item!r}")
        value = value.strip()
        parsed: object = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        else:
            for cast in (int, float):
                try:
                    parsed = cast(value)
                    break
                except ValueError:
                    continue
        out[key.strip()] = parsed
    return out


def build_manifest(
    authority: Identity, *, run_id: str, preset: str, n_stages: int, validators: Sequence[bytes],
    trainers: Sequence[bytes], ban_quorum: int, sentinel: SentinelConfig | None = None,
    created_at: float | None = None,
) -> SignedManifest:  # fmt: skip
    """The signed manifest of a new swarm: the preset's blocks split evenly over the stages."""
    if not validators or not trainers:
        raise CommandError("a swarm needs at least one --validator-key and one --trainer-key")
    if not 1 <= ban_quorum <= len(validators):
        raise CommandError(f"--ban-quorum must be in 1..{len(validators)} (the number of validator keys)")
    cfg = resolve_config(preset, n_stages)
    manifest = Manifest(
        run_id, preset, n_stages, split_layers(cfg.n_layers, n_stages),
        sentinel_to_config(sentinel or SentinelConfig()),
        list(validators), list(trainers), ban_quorum, time.time() if created_at is None else created_at,
        authority.public_key,
    )  # fmt: skip
    return manifest.sign(authority)


def manifest_json(signed: SignedManifest) -> dict:
    m = signed.manifest
    return {
        "run_id": m.run_id, "preset": m.preset, "n_stages": m.n_stages,
        "layer_spans": [list(s) for s in m.layer_spans],
        "sentinel_config": dict(m.sentinel_config), "validators": [k.hex() for k in m.validators],
        "trainers": [k.hex() for k in m.trainers], "ban_quorum": m.ban_quorum, "created_at": m.created_at,
        "authority": m.authority.hex(), "digest": m.digest().hex(), "signature": signed.signature.hex(),
    }  # fmt: skip


def load_manifest_json(path: str | Path, authority: bytes) -> SignedManifest:
    """The signed manifest in a file that ``manifest_json`` wrote, verified against ``authority``; CommandError
    (naming the file) for anything else: unreadable, not JSON, malformed, another authority's, or tampered with."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CommandError(f"cannot read the manifest file {path}: {type(e).__name__}: {e}") from None
    try:
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        manifest = Manifest(
            data["run_id"], data["preset"], data["n_stages"], [tuple(span) for span in data["layer_spans"]],
            data["sentinel_config"], [bytes.fromhex(k) for k in data["validators"]],
            [bytes.fromhex(k) for k in data["trainers"]], data["ban_quorum"], data["created_at"],
            bytes.fromhex(data["authority"]),
        )  # fmt: skip
        signed = SignedManifest(manifest, bytes.fromhex(data["signature"]))
        signed.verify(authority=authority)
    except (KeyError, TypeError, ValueError, RecordError) as e:
        raise CommandError(f"{path} is not a manifest signed by authority {authority.hex()[:16]}...: "
                           f"{type(e).__name__}: {e}") from None  # fmt: skip
    if data.get("digest") not in (None, manifest.digest().hex()):
        raise CommandError(f"{path}: its digest field does not match its manifest")
    return signed


def wait_for_manifest(
    dht, run_id: str, authority: bytes, *, timeout: float, digest: bytes | None = None, stop: StopFlag | None = None
) -> Manifest:
    """Poll the DHT for the run's manifest signed by ``authority`` (and matching ``digest``); bounded."""
    return wait_for_signed_manifest(dht, run_id, authority, timeout=timeout, digest=digest, stop=stop).manifest


def wait_for_signed_manifest(
    dht, run_id: str, authority: bytes, *, timeout: float, digest: bytes | None = None, stop: StopFlag | None = None
) -> SignedManifest:
    """``wait_for_manifest``, with the authority's signature (what a relay re-publishes)."""
    from swarm.dht_schema import fetch_manifest

    deadline = time.monotonic() + timeout
    while True:
        signed = fetch_manifest(dht, run_id, authority, digest)
        if signed is not None:
            return signed
        if stop is not None and stop.is_set():
            raise CommandError("stopped while waiting for the manifest")
        if time.monotonic() >= deadline:
            other = fetch_manifest(dht, run_id, authority) if digest is not None else None
            if other is not None:
                raise CommandError(
                    f"the manifest of run {run_id!r} in the DHT (digest {other.manifest.digest().hex()[:16]}...) does "
                    f"not match --manifest-digest {digest.hex()[:16]}...: the authority re-created the swarm, or the "
                    f"digest is wrong"
                )
            raise CommandError(
                f"no manifest for run {run_id!r} signed by authority {authority.hex()[:16]}... found in the DHT after "
                f"{timeout:.0f} s: check --run-id, --authority and --initial-peers, and that the bootstrap peer with "
                f"--new-swarm (or a relay: bootstrap --run-id --authority) is running"
            )
        time.sleep(0.5)


def join_commands(
    manifest: Manifest, initial_peers: Sequence[str], *, identity_dir: str = "~/.sentinel",
    program: str = "sentinel-node",
) -> dict[str, list[str]]:  # fmt: skip
    """The exact ``join`` command of each role (argv lists; pure function of the manifest and the addresses).

    Keys: ``gpu-stage`` (stage 1; change --stage, and the key file per replica: each replica needs an identity of
    its own, since a stage's announcements are kept one per key), ``validator`` and ``trainer`` (run with the
    identity whose public key the manifest lists).
    """
    common = [
        "--initial-peers", *initial_peers, "--run-id", manifest.run_id, "--authority", manifest.authority.hex(),
        "--manifest-digest", manifest.digest().hex(),
    ]  # fmt: skip
    return {
        "gpu-stage": [program, "join", "--role", "gpu-stage", *common, "--identity", f"{identity_dir}/stage1.key",
                      "--stage", "1"],
        "validator": [program, "join", "--role", "validator", *common, "--identity",
                      f"{identity_dir}/validator.key"],
        "trainer": [program, "join", "--role", "trainer", *common, "--identity", f"{identity_dir}/trainer.key"],
    }  # fmt: skip


def format_command(argv: Sequence[str]) -> str:
    return shlex.join(argv)


# --------------------------------------------------------------------------------------------- lifecycle
class StopFlag:
    """Set by SIGINT/SIGTERM (installed in the main thread); ``wait`` sleeps until set or timeout.

    Only in the process that installed it: hivemind forks the DHT's process from this one, and a forked child inherits
    the handler. There a SIGTERM (hivemind's own "terminate the hard way" after a shutdown's grace period, or a signal
    to the whole process group, as Ctrl-C and service managers send) would only set the child's copy of the flag: the
    child lived on and the node, waiting for it, never exited. In a child the handler restores the default action and
    signals itself again."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal: int | None = None
        self._pid = os.getpid()

    def install(self) -> StopFlag:
        self._pid = os.getpid()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child (the DHT's process): not ours to stop gracefully
            if signum == signal.SIGINT:
                return  # Ctrl-C reaches the whole group: the node itself shuts its DHT down
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep in short slices: a signal delivered to another thread (hivemind runs several) only runs its Python
        handler when the main thread wakes up, so one long wait would sit on a SIGTERM for its whole timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self.event.is_set():
            left = 0.5 if end is None else min(0.5, end - time.monotonic())
            if left <= 0:
                break
            self.event.wait(left)
        return self.event.is_set()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file of its own, renamed over ``path``: a reader sees the old
    file or the new one, never a part, and a crash leaves no half file. Several writers may race on one path (the
    nodes of a demo share their state folder and each keeps the manifest there): each has its own temporary file,
    the last rename wins."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # as a plain write would leave it (mkstemp's file is private): other users read these
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def say(*parts, flush: bool = True) -> None:
    """A progress line on stdout (the demo relays these)."""
    print(*parts, flush=flush)


def ensure_identity(path: str | os.PathLike, *, create: bool) -> Identity:
    from swarm.identity import IdentityError, load_or_create

    path = Path(path).expanduser()
    if create:
        return load_or_create(path)
    if not path.exists():
        raise CommandError(f"identity file {path} does not exist (create one with: sentinel-node keygen --out {path})")
    try:
        return Identity.load(path)
    except IdentityError as e:
        raise CommandError(str(e)) from None


def replace_sentinel(sentinel: SentinelConfig, overrides: dict) -> SentinelConfig:
    """``sentinel`` with ``overrides`` (``--sentinel key=value``), each of its setting's type: an integer setting
    takes an integer (``ban_level=2.5`` was signed into a manifest as it was), a number a number, a flag a flag."""
    known = {f.name for f in fields(sentinel)}
    for key, value in overrides.items():
        if key not in known:
            raise CommandError(f"unknown --sentinel setting: {key!r}")
        default = getattr(sentinel, key)
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = True
        if not ok:
            raise CommandError(f"--sentinel {key}={value!r}: {key} takes a {type(default).__name__}")
    try:
        return replace(sentinel, **overrides)
    except TypeError as e:
        raise CommandError(f"--sentinel: {e}") from None


def write_public_key(identity_path: str | os.PathLike, identity: Identity) -> Path:
    """``IDENTITY.pub``: the public key hex next to an identity file (public; what --*-key @PATH reads)."""
    pub = Path(f"{identity_path}.pub")
    pub.write_text(identity.public_hex + "\n")
    return pub
