"""Running a comparison's worker jobs: how many at once and on how many threads (Lanes), in which order (a row
waits for the class images it trains with), each in a process of its own, reusing a finished run whose job
is unchanged, and stopping them all when the comparison is stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdtuneError
from .progress import Board, job_work
from .worker import EVENT


def stop_on_sigterm():
    """Make SIGTERM stop the comparison as Ctrl-C does (its runs' processes stopped with it, not left running);
    returns what puts the previous handler back (nothing to do where signals cannot be set: not the main
    thread, e.g. the UI)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@dataclass(frozen=True)
class Lanes:
    """How many runs go at once and how many CPU threads each gets.

    On a CPU, runs side by side on a thread each beat one run on every thread: on the 2-core development
    machine a LoRA step took the same time on one thread as on two, and two single-thread runs at once did
    twice the work (BENCHMARKS.md). On a GPU runs go one at a time, so each has the card to itself and its
    time and memory are its own."""

    count: int
    threads: int

    @classmethod
    def for_machine(cls, asked: int, model: str) -> Lanes:
        import torch

        if asked < 0:
            raise SdtuneError(f"--jobs is {asked}; give 1 or more (or 0 for as many as suit this machine).")
        cores = os.cpu_count() or 1
        if torch.cuda.is_available():
            count = asked or 1
        else:
            # Each run holds its own copy of the model: a big one on a CPU goes alone unless asked otherwise.
            count = asked or (min(cores, MAX_CPU_LANES) if model.startswith(SMALL_MODELS) else 1)
        return cls(count, max(1, cores // count))


MAX_CPU_LANES = 4  # beyond this, one run's threads are worth more than another run (and memory adds up)
SMALL_MODELS = ("builtin", "tiny:")  # models of a few million parameters (< 1 GB per run)


def run_jobs(jobs: list[dict], logs: Path, board: Board, lanes: Lanes, fresh: bool = False
             ) -> dict[tuple[str, str, int], dict]:
    """Run every job, `lanes.count` at a time, in the given order except that a row waits for the class
    images it trains with; returns each job's result by (subject, row, seed)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    makes = {_class_folder(job): id(job) for job in jobs if job["kind"] == "class-images"}
    finished: set[int] = set()
    pending, running, runs = list(jobs), {}, {}

    def ready(job: dict) -> bool:  # its class images, if it trains with generated ones, are done
        maker = makes.get(_class_folder(job))
        return maker is None or maker == id(job) or maker in finished

    workers: set[subprocess.Popen] = set()  # the running jobs' processes: stopped with the comparison
    with ThreadPoolExecutor(lanes.count) as pool:
        try:
            while pending or running:
                for job in [job for job in pending if ready(job)][:lanes.count - len(running)]:
                    pending.remove(job)
                    running[pool.submit(run_job, job, logs, board, fresh, lanes.threads, workers)] = job
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    job = running.pop(future)
                    finished.add(id(job))
                    runs[(job["subject"], job["row"], job["seed"])] = future.result()
        except BaseException:  # Ctrl-C, SIGTERM (see stop_on_sigterm): start nothing new, stop what runs
            pending.clear()
            for process in list(workers):
                process.kill()
            raise
    return {(job["subject"], job["row"], job["seed"]): runs[(job["subject"], job["row"], job["seed"])]
            for job in jobs}


def _class_folder(job: dict) -> str:
    """The class-image folder a job makes or trains with ("" for none)."""
    return str((job.get("data") or {}).get("class_images") or "")


def run_job(job: dict, logs: Path, board: Board, fresh: bool = False, threads: int = 0,
            workers: set | None = None) -> dict:
    """Run one worker job in a subprocess (or reuse its finished folder); returns its result or {"error"}.
    A reused result says so ("reused": true), so the report does not pass this invocation's time off as
    the comparison's. `threads`: the CPU threads the run may use (0: torch's default); `workers`: the set
    its process is in while it runs."""
    workers = set() if workers is None else workers
    folder = Path(job["out"])
    key = board.start(job_work(job))
    if not fresh and _finished(folder, job):
        board.finish(key, "reused")
        return {**json.loads((folder / "result.json").read_text()), "reused": True}
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{job['subject'] + '-' if job.get('subject') else ''}{job['row']}-seed-{job['seed']}.log"
    error = ""
    env = {**os.environ, "DIFFUSERS_VERBOSITY": "error", "TRANSFORMERS_VERBOSITY": "error",
           "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore"}
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen([sys.executable, "-m", "sdtune.compare.worker"], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        workers.add(process)
        try:
            process.stdin.write(json.dumps(job))
            process.stdin.close()
            for line in process.stdout:
                if line.startswith(EVENT):
                    event = json.loads(line[len(EVENT):])
                    error = event.get("message", error) if event.get("event") == "error" else error
                    board.event(key, event)
                else:
                    log.write(line)
            code = process.wait()
        except BaseException:
            process.kill()
            process.wait()
            raise
        finally:
            workers.discard(process)
    if code == 0 and (folder / "result.json").is_file():
        board.finish(key)
        return json.loads((folder / "result.json").read_text())
    board.finish(key, "failed")
    return {"error": error or f"{_last_line(log_path)} (exit status {code}; log: {log_path})"}


# Where a job names a path: those inside the comparison folder are compared relative to it.
PATH_FIELDS = (("out",), ("images",), ("data", "class_images"))


def _finished(folder: Path, job: dict) -> bool:
    """A run folder holding a result for exactly this job (also after the comparison folder was moved)."""
    try:
        done = json.loads((folder / "job.json").read_text())
        return _portable(done) == _portable(job) and (folder / "result.json").is_file()
    except (OSError, ValueError, TypeError, KeyError):
        return False


def _portable(job: dict) -> dict:
    """The job with paths inside its comparison folder ("output") made relative to it."""
    root = Path(job["output"])
    out = json.loads(json.dumps(job))
    del out["output"]
    for fields in PATH_FIELDS:
        holder = out
        for key in fields[:-1]:
            holder = holder.get(key) or {}
        value = holder.get(fields[-1])
        if isinstance(value, str) and Path(value).is_relative_to(root):
            holder[fields[-1]] = Path(value).relative_to(root).as_posix()
    return out


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "the run stopped without a message"
