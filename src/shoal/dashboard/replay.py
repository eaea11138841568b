"""A run directory as a :class:`~shoal.dashboard.state.RunState`: replayed, and followed while
``shoal run`` is still writing it.

``metrics.jsonl`` gains one line per final round (the run directory's writer appends and
closes the file each time) and ``summary.json`` appears when the run ends, so following a run
is reading the lines that are new since the last look, and calling it finished once the
summary is there.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from shoal.config import Config, load_config
from shoal.dashboard.state import RunInfo, RunState
from shoal.errors import DataError

__all__ = ["RunDirFollower"]


def _config_of(run_dir: Path) -> Config:
    path = run_dir / "config.toml"
    if not path.is_file():
        raise DataError(f"{run_dir} is not a run directory: it has no config.toml (a run "
                        f"directory holds config.toml and metrics.jsonl)", path=str(run_dir))
    return load_config(path)


class RunDirFollower:
    """Reads a run directory into a :class:`RunState`, and keeps reading as it grows.

    Args:
        run_dir: the directory (``runs/<name>``).
        history: rows the state keeps.

    Raises:
        DataError: ``run_dir`` has no ``config.toml``.
        ConfigError: its ``config.toml`` does not load.
    """

    def __init__(self, run_dir: str | Path, *, history: int = 100_000) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = _config_of(self.run_dir)
        summary = self._summary()
        self.state = RunState(RunInfo.of(self.cfg, self.run_dir.name, "replay",
                                         int(summary.get("num_params", 0) or 0)),
                              history=history)
        self._offset = 0
        self._line = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.poll()

    def _summary(self) -> dict:
        try:
            return json.loads((self.run_dir / "summary.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}  # not finished yet (or being written): try again at the next poll

    def poll(self) -> int:
        """Read what is new; returns the number of rows added.

        Raises:
            DataError: a complete line of ``metrics.jsonl`` is not a JSON object.
        """
        path = self.run_dir / "metrics.jsonl"
        added = 0
        try:
            with open(path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            data = b""
        end = data.rfind(b"\n") + 1  # a line still being written is read next time
        for raw in data[:end].splitlines():
            self._line += 1
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{self._line} is not JSON: {exc}",
                                path=str(path)) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{self._line} is not a JSON object", path=str(path))
            self.state.add_row(row)
            added += 1
        self._offset += end
        if self.state.status != "finished":
            summary = self._summary()
            if summary:
                stopped = summary.get("stopped") or ""
                self.state.set_status("finished", f"stopped early: {stopped}" if stopped
                                      else "")
            elif self.state.status == "starting" and self._offset:
                self.state.set_status("running")
        return added

    def start(self, interval_s: float = 0.5) -> None:
        """Poll every ``interval_s`` seconds on a daemon thread until :meth:`stop`."""
        def loop() -> None:
            while not self._stop.wait(interval_s):
                if self.state.status == "finished":
                    return
                try:
                    self.poll()
                except DataError as exc:
                    self.state.set_status("failed", str(exc))
                    return

        self._thread = threading.Thread(target=loop, name="shoal-dashboard-follow",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

