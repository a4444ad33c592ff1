"""CURVE keys for every socket that crosses hosts, and who may act for which device.

A keys directory (`cecollm keys`) holds the broker's key pair (the content manager uses it too),
the public keys it accepts and what each may do, and one bundle per client to copy to that host:

    broker.key, broker.key_secret      the cloud's key pair
    devices.txt                        "<public key> <device ids>" a line: ids as 3, 4-7, or *
    workers.txt                        "<public key> <name>" a line: worker hosts
    bundles/<name>/                    client.key, client.key_secret, broker.key (to copy to the client)

Servers authenticate with ZeroMQ's ZAP (pyzmq's authenticator, in a thread of the serving
process): a connection whose key is not listed never reaches the serving loop. The key that
CURVE authenticated reaches the loop as each message's User-Id; the loop checks it against the
device a message names (`KeyRing.may_act_for`), whatever the message says. SIGHUP reloads the
lists (`KeyRing.reload`); a key taken out is refused from its next connection on.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from cecollm.config import cecollm_home
from cecollm.errors import UserError

log = logging.getLogger(__name__)

DEVICES, WORKERS = "devices", "workers"  # ZAP domains: who may connect to which server socket
MAX_DEVICE_ID = (1 << 32) - 1


def parse_ids(text: str) -> list[tuple[int, int]]:
    """'3,4-7' -> [(3, 3), (4, 7)]; '*' -> every device id."""
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "*":
            ranges.append((0, MAX_DEVICE_ID))
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise UserError(f"device ids are numbers or ranges like 3,4-7 or *, got {text!r}") from None
        if not 0 <= first <= last <= MAX_DEVICE_ID:
            raise UserError(f"device ids {part!r} out of 0..{MAX_DEVICE_ID}")
        ranges.append((first, last))
    if not ranges:
        raise UserError("no device ids given")
    return ranges


@dataclass(frozen=True)
class ClientKeys:
    """What a client (an edge or a worker host) needs: its key pair and the broker's public key."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, bundle: str | Path) -> ClientKeys:
        bundle = Path(bundle)
        try:
            public, secret = zmq.auth.load_certificate(bundle / "client.key_secret")
            server, _ = zmq.auth.load_certificate(bundle / "broker.key")
        except (OSError, ValueError) as exc:
            raise UserError(f"{bundle} is not a key bundle from `cecollm keys` ({exc})") from None
        if secret is None:
            raise UserError(f"{bundle}/client.key_secret holds no secret key")
        return cls(public, secret, server)

    def secure(self, sock: zmq.Socket) -> None:
        """Make `sock` (not yet connected) a CURVE client of the broker."""
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = self.public, self.secret, self.server


class KeyRing:
    """The broker's key pair and the lists of accepted keys, reloadable."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        try:
            self.public, self.secret = zmq.auth.load_certificate(self.directory / "broker.key_secret")
        except (OSError, ValueError):
            raise UserError(f"no broker keys in {self.directory}: make them with `cecollm keys {self.directory}`, "
                            "or run with --insecure (loopback only, no encryption)") from None
        self._lock = threading.Lock()
        self.devices: dict[bytes, list[tuple[int, int]]] = {}  # public key (z85) -> device id ranges
        self.workers: dict[bytes, str] = {}  # public key (z85) -> name
        self.local_workers: dict[bytes, str] = {}  # keys made at startup for this host's own workers
        self.reload()

    def reload(self) -> None:
        """Read devices.txt and workers.txt again (SIGHUP)."""
        devices = {key: parse_ids(rest) for key, rest in _lines(self.directory / "devices.txt")}
        workers = {**dict(_lines(self.directory / "workers.txt")), **self.local_workers}
        with self._lock:
            self.devices, self.workers = devices, workers
        log.info("keys: %d device keys, %d worker keys from %s", len(devices), len(workers), self.directory)

    def local_worker_keys(self, name: str = "local") -> ClientKeys:
        """A key pair for a worker this process starts (accepted until the process ends, never written)."""
        public, secret = zmq.curve_keypair()
        self.add_worker(public, name)
        return ClientKeys(public, secret, self.public)

    def add_worker(self, public: bytes, name: str) -> None:
        with self._lock:
            self.local_workers[public] = name
            self.workers[public] = name

    def may_act_for(self, user_id, device_id: int) -> bool:
        """Whether the key CURVE authenticated (a message's User-Id) may act for `device_id`."""
        key = user_id.encode() if isinstance(user_id, str) else user_id
        with self._lock:
            ranges = self.devices.get(key, ())
        return any(first <= device_id <= last for first, last in ranges)

    def accepts(self, domain: str, key: bytes) -> bool:
        with self._lock:
            return key in (self.devices if domain == DEVICES else self.workers)

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        """Make `sock` (not yet bound) a CURVE server whose clients are checked in `domain`."""
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self.public, self.secret
        sock.zap_domain = domain.encode()

    def authenticator(self, context: zmq.Context) -> ThreadAuthenticator:
        """A started ZAP authenticator for the sockets of `context` (stop() it on the way out)."""
        auth = ThreadAuthenticator(context, log=logging.getLogger("cecollm.zap"))
        auth.start()
        for domain in (DEVICES, WORKERS):
            auth.configure_curve_callback(domain, _Provider(self, domain))
        return auth


class _Provider:
    """pyzmq's credentials callback: a key is accepted when it is listed for the domain."""

    def __init__(self, ring: KeyRing, domain: str) -> None:
        self.ring, self.domain = ring, domain

    def callback(self, domain: str, key: bytes) -> bool:
        ok = self.ring.accepts(self.domain, key)
        if not ok:
            log.warning("refused a connection: key %s... is not a %s key", key[:8].decode(errors="replace"), self.domain)
        return ok


def loopback_only(endpoint: str) -> str:
    """`endpoint` bound on loopback only (tcp://*:P -> tcp://127.0.0.1:P); a UserError for another host's
    address (without keys nothing may listen beyond this host)."""
    if not endpoint.startswith("tcp://"):
        return endpoint  # ipc:// is a file on this host
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if host in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{port}"
    if host in ("localhost", "[::1]") or host.startswith("127."):
        return endpoint
    raise UserError(f"--insecure binds loopback only, not {endpoint}: make keys (`cecollm keys`) to serve other hosts")


def _lines(path: Path) -> list[tuple[bytes, str]]:
    if not path.is_file():
        return []
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):  # a comment (z85 keys may hold "#", so only at the start)
            continue
        key, _, rest = line.partition(" ")
        if len(key) != 40:
            raise UserError(f"{path}:{number}: a line is a 40-character public key, then the rest")
        out.append((key.encode(), rest.strip()))
    return out


def make_keys(directory: str | Path, devices: list[tuple[str, str]], workers: list[str]) -> list[Path]:
    """Make the broker's key pair (kept if there is one) and a bundle for each (name, ids) device and
    each worker name, listed in devices.txt / workers.txt; the bundles made."""
    directory = Path(directory)
    planned = [(f"device-{name}", "devices", ids) for name, ids in devices]
    planned += [(f"worker-{name}", "workers", name) for name in workers]
    for name, kind, rest in planned:  # every check before anything is written: no half-made set
        if kind == "devices":
            parse_ids(rest)
        if bundle(name, directory).exists() or [p[0] for p in planned].count(name) > 1:
            raise UserError(f"{bundle(name, directory)} exists already: give another name")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    if not (directory / "broker.key_secret").is_file():
        zmq.auth.create_certificates(str(directory), "broker")
    made = []
    for name, kind, rest in planned:
        path = bundle(name, directory)
        path.mkdir(parents=True)
        public_file, _ = zmq.auth.create_certificates(str(path), "client")
        (path / "broker.key").write_bytes((directory / "broker.key").read_bytes())
        public, _ = zmq.auth.load_certificate(public_file)
        with open(directory / f"{kind}.txt", "a") as f:
            f.write(f"{public.decode()} {rest}\n")
        made.append(path)
    return made


def default_dir() -> Path:
    """Where `cecollm keys` puts the cloud's keys and bundles, and where the commands look: $CECOLLM_HOME/keys."""
    return cecollm_home() / "keys"


def bundle(name: str, directory: str | Path | None = None) -> Path:
    """The bundle `name` (device-3, worker-gpu1) in a keys directory (default: default_dir())."""
    return Path(directory or default_dir()) / "bundles" / name


def launcher_keys(directory: str | Path) -> tuple[Path, Path]:
    """Keys in `directory` for a launcher that starts a cloud itself (tests, benchmarks, the soak): a device
    bundle for any device id and a worker bundle, made on the first call; (device bundle, worker bundle)."""
    device, worker = bundle("device-any", directory), bundle("worker-any", directory)
    if not device.is_dir():
        make_keys(directory, [("any", "*")], ["any"])
    return device, worker
