"""Comparison runs from the UI: `sdtune compare --output DIR` in a subprocess, its log, and its report."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdtuneError

LOG_NAME = "ui-compare.log"
ERROR_PREFIX = "sdtune: error: "


def compare_options() -> set[str] | None:
    """The option strings of `sdtune compare`, or None when this sdtune has no compare command."""
    from ..cli import build_parser

    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and "compare" in action.choices:
            return {s for a in action.choices["compare"]._actions for s in a.option_strings}
    return None


def compare_command(out_dir: Path, methods: str, model: str, model_config: str | None = None) -> list[str]:
    """The CLI call that runs a comparison into `out_dir`, passing the UI's model and the chosen methods
    where this sdtune's compare takes them."""
    options = compare_options()
    if options is None:
        raise SdtuneError("This sdtune has no compare command yet; open an existing report folder instead.")
    command = [sys.executable, "-m", "sdtune.cli", "compare", "--output", str(out_dir)]
    wanted = {"--model": model, "--model-config": model_config, "--methods": methods.strip()}
    for flag, value in wanted.items():
        if value and flag in options:
            command += [flag, value]
    return command


@dataclass
class CompareStatus:
    """What the Compare tab shows about the latest run."""

    state: str  # idle | running | done | failed | cancelled
    output: Path | None = None
    log: str = ""
    message: str = ""


class CompareRunner:
    """One comparison subprocess at a time; its output goes to a log file beside the report."""

    def __init__(self, command: Callable[[Path, str], list[str]]):
        self._command = command
        self._process: subprocess.Popen | None = None
        self._output: Path | None = None
        self._cancelled = False
        self._lock = threading.Lock()

    def start(self, out_dir: Path, methods: str = "default") -> Path:
        with self._lock:
            if self._process is not None and self._process.poll() is None:
                raise SdtuneError(f"A comparison is already running into {self._output}; wait for it or cancel it.")
            command = self._command(out_dir, methods)
            out_dir.mkdir(parents=True, exist_ok=True)
            with open(out_dir / LOG_NAME, "wb") as log:
                self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                 stdin=subprocess.DEVNULL)
            self._output, self._cancelled = out_dir, False
            return out_dir

    def cancel(self) -> str:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                return "No comparison is running."
            self._cancelled = True
            self._process.terminate()
            return "Comparison cancelled."

    def wait(self, timeout: float | None = None) -> CompareStatus:
        if self._process is not None:
            self._process.wait(timeout)
        return self.status()

    def status(self) -> CompareStatus:
        with self._lock:
            process, output = self._process, self._output
        if process is None or output is None:
            return CompareStatus("idle")
        log = _tail(output / LOG_NAME)
        code = process.poll()
        if code is None:
            return CompareStatus("running", output, log, f"Comparing into {output}…")
        if self._cancelled:
            return CompareStatus("cancelled", output, log, "Comparison cancelled.")
        if code == 0 and (output / "report.html").is_file():
            return CompareStatus("done", output, log, f"Comparison finished: {output / 'report.html'}.")
        lines = [line.strip() for line in log.splitlines() if line.strip()]
        errors = [line.removeprefix(ERROR_PREFIX) for line in lines if line.startswith(ERROR_PREFIX)]
        last = (errors or lines or [f"sdtune compare exited with status {code}."])[-1]
        return CompareStatus("failed", output, log, last)


def _tail(path: Path, limit: int = 4000) -> str:
    """The end of a log, with progress bars' carriage-return redraws reduced to their latest state."""
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data[-limit:].decode("utf-8", errors="replace")
    return "\n".join(line.rstrip("\r").rsplit("\r", 1)[-1] for line in text.split("\n"))


def report_summary(folder: Path) -> dict | list | None:
    """results.json of a report folder, when it has a readable one."""
    try:
        return json.loads((Path(folder) / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def report_folders(root: Path) -> list[str]:
    """Folders under `root` (one level) that hold a report.html."""
    if not root.is_dir():
        return []
    return sorted(str(p) for p in root.iterdir() if (p / "report.html").is_file())
