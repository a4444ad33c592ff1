"""What a fanout run is: its settings, checked before anything starts (importable without torch)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cecollm.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODEL, DEFAULT_THRESHOLD
from cecollm.dtypes import default_dtype
from cecollm.errors import UserError
from cecollm.prompting import read_prompt_file

if TYPE_CHECKING:  # imports torch: loaded where it is used, so the CLI's --help is fast
    from cecollm.edge.client import EdgeConfig

MODES = ("live", "replay")


@dataclass(frozen=True)
class FanoutConfig:
    """One fanout run; tools/fanout.py options take their defaults from here."""

    clients: int = 1  # devices running at once, each with its own device id
    broker: str = "tcp://127.0.0.1:5555"  # the broker's request address
    upload: str = ""  # the upload address; "" = derived as the edge does (tcp port + 1, ipc ...uploads)
    prompts: str | tuple[str, ...] = ""  # a JSONL prompts file, or the prompts themselves (live mode, recording)
    n_prompts: int = 0  # use the first n prompts; 0 = all
    raw: bool = False  # use prompts as they are, without the chat template
    mode: str = "replay"  # "live": real EdgeClients; "replay": devices replay `trace`
    trace: str = ""  # the trace file (replay reads it, record_trace writes it; rows in <trace>.rows.npy)
    model: str = DEFAULT_MODEL  # live/record: a transformers directory, .gguf file, or the default model's name
    heads: str = ""  # live/record: exit heads file; "" = the model's default heads
    exits: str = ""  # live/record: exits "8,15"; "" = the model's default split
    upload_layer: int = 0  # live/record: layer whose output is uploaded; 0 = the last exit
    threshold: float = DEFAULT_THRESHOLD  # live/record: exit confidence threshold; 1.0 disables exits
    fp16: bool = True  # live/record: 2-byte rows on the wire (dtypes.wire_dtype; False: float32)
    dtype: str = field(default_factory=default_dtype)  # live/record: the model's compute dtype (the broker's)
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # live/record: tokens per generation at most
    timeout: float = 20.0  # seconds a request may take before it counts as a timeout
    pace: float = 1.0  # replay: recorded edge time is multiplied by this (0: requests back to back)
    stagger: float = 0.0  # clients start at random offsets in [0, stagger) seconds (seeded)
    rotate: bool = True  # client i starts at generation i (mod count): clients do not move in lockstep
    duration: float = 0.0  # replay: go round the trace's generations until this many seconds pass (0: each once)
    seed: int = 0  # seeds the start offsets
    device_base: int = 1000  # client i is device device_base + i
    broker_pid: int = 0  # the broker's pid, to find its content manager; 0 = any process bound to the upload address
    cm_pid: int = 0  # the content manager's pid if known (wins over broker_pid)
    memory_interval: float = 0.1  # seconds between memory samples
    threads: int = 1  # torch threads (live/record)
    keys: str = ""  # a device key bundle for every client (its ids must cover device_base + 0..clients-1)
    insecure: bool = False  # no keys: for a broker started with --insecure

    @property
    def edge(self) -> EdgeConfig:
        """The EdgeConfig a device of this run uses (device id set per client)."""
        from cecollm.edge.client import EdgeConfig

        # the paper's mode: a trace records its DECIDE requests and replays them
        return EdgeConfig(device_id=self.device_base, broker=self.broker, upload=self.upload, threshold=self.threshold,
                          exact=False,
                          fp16=self.fp16, max_new_tokens=self.max_new_tokens, timeout=self.timeout,
                          max_timeouts=1 << 30, keys=self.keys, insecure=self.insecure)


def check_config(config: FanoutConfig) -> None:
    """Bad values and an unreachable broker are UserErrors (one line), before anything starts."""
    if config.clients < 1:
        raise UserError(f"--clients must be at least 1, got {config.clients}")
    if config.mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, got {config.mode!r}")
    if config.timeout <= 0 or config.pace < 0 or config.stagger < 0 or config.n_prompts < 0 or config.duration < 0:
        raise UserError("--timeout must be positive; --pace, --stagger, --n-prompts and --duration not negative")
    if not 0.0 <= config.threshold <= 1.0 or config.max_new_tokens < 1:
        raise UserError("--threshold must be in [0, 1] and --max-new-tokens at least 1")
    for address in (config.broker, config.upload or None):
        if address is not None and not address.startswith(("tcp://", "ipc://")):
            raise UserError(f"address {address!r} must start with tcp:// or ipc://")
    try:
        upload = config.edge.upload_address
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _reachable(config.broker, "the broker's request address")
    _reachable(upload, "the broker's upload address" + ("" if config.upload else ", derived: give --upload"))
    config.edge.client_keys()  # a missing or damaged key bundle: one line now, not an error per device


def _reachable(address: str, what: str) -> None:
    if address.startswith("ipc://"):
        if not Path(address[len("ipc://"):]).exists():
            raise UserError(f"no broker at {address} ({what}; the socket file does not exist)")
        return
    host, _, port = address[len("tcp://"):].rpartition(":")
    if not port.isdigit() or not host or host == "*":
        raise UserError(f"address {address!r} is not tcp://HOST:PORT")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=3):
            pass
    except OSError as exc:
        raise UserError(f"no broker at {address} ({what}): {exc.strerror or exc}") from None


def read_prompt_texts(config: FanoutConfig) -> list[str]:
    if isinstance(config.prompts, str):
        if not config.prompts:
            raise UserError("give prompts (--prompts FILE.jsonl)")
        if not Path(config.prompts).is_file():
            raise UserError(f"prompts file {config.prompts} does not exist")
        texts = read_prompt_file(config.prompts)
    else:
        texts = list(config.prompts)
    texts = texts[: config.n_prompts] if config.n_prompts else texts
    if not texts:
        raise UserError("no prompts")
    return texts


