"""A run's raw results: one JSON line per finished (strategy, dataset, prompt); reruns skip those.

results/<run>/run.json records what the numbers depend on (model, split, heads, link, token
budget, threads); a rerun with other settings into the same directory is refused rather than
mixed. A line cut short by a crash is ignored (and its prompt runs again).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cecollm.errors import UserError

log = logging.getLogger(__name__)


class RawStore:
    """results/<run>/raw/<dataset>__<strategy>.jsonl, appended to as results arrive."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out = Path(out_dir)
        self.raw = self.out / "raw"

    def check_settings(self, settings: dict) -> None:
        """Write run.json, or check that an earlier run in this directory used the same settings."""
        path = self.out / "run.json"
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{path} is not a run's settings (not JSON); give another --out") from None
            if not isinstance(old, dict):
                raise UserError(f"{path} is not a run's settings; give another --out")
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} then, {settings.get(k)!r} now" for k in diff)
                raise UserError(f"{self.out} holds results made with other settings ({shown}); "
                                f"give another --out")
            return
        try:
            self.raw.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
        except OSError as exc:  # --out names a file, or a place this user cannot write
            raise UserError(f"cannot write results into {self.out}: {exc.strerror or exc}") from None

    def _file(self, dataset: str, strategy: str) -> Path:
        return self.raw / f"{dataset}__{strategy}.jsonl"

    def load(self) -> dict[tuple[str, str, int], dict]:
        """Every finished record, keyed by (dataset, strategy, prompt index)."""
        found: dict[tuple[str, str, int], dict] = {}
        if not self.raw.is_dir():
            return found
        for path in sorted(self.raw.glob("*__*.jsonl")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    rec = json.loads(line)
                    key = (rec["dataset"], rec["strategy"], int(rec["index"]))
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("%s:%d: unreadable line skipped (that prompt runs again)", path, number)
                    continue
                found[key] = rec
        return found

    def append(self, record: dict) -> None:
        self.raw.mkdir(parents=True, exist_ok=True)
        path = self._file(record["dataset"], record["strategy"])
        cut = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        with path.open("a") as f:
            f.write(("\n" if cut else "") + json.dumps(record, allow_nan=False) + "\n")  # a cut line stays alone
