"""The training loop the recipe's phases share: a wall-clock budget, step-count planning, logging and the
rolling checkpoint. A phase supplies a step function returning its loss; the loop owns everything else."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from sdtune.errors import SdtuneError
from sdtune.toyworld import ckpt as ck


def lr_at(step: int, planned: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up, then cosine decay to min_ratio * base at the planned last step."""
    warmup = max(1, min(warmup, planned // 5))
    if step < warmup:
        return base * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, planned - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class Run:
    """Shared state of one invocation: config, device, deadlines, logging and the checkpoint path."""

    def __init__(self, args: argparse.Namespace, cfg: dict[str, Any], t0: float):
        self.args, self.cfg, self.t0 = args, cfg, t0
        self.device = torch.device(args.device)
        self.deadline = t0 + args.minutes * 60 - cfg["budget"]["reserve_seconds"]
        self.ckpt_path = Path(args.ckpt)
        self.log_path = Path(args.report_dir) / "pretrain.log" if args.report_dir else None
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        self.train_seconds = max(0.0, self.deadline - time.monotonic())  # reset once the data is ready
        self.vae_half: dict[str, torch.Tensor] = {}
        self.scaling_factor = 1.0

    def log(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(line + "\n")

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class Pace:
    """Times steps to fix the step count that fits a deadline, and shrinks it if the run slows down later
    (so the cosine schedule still ends near its floor instead of being cut off at a high learning rate)."""

    def __init__(self, run: Run, name: str, deadline: float, cap: int, start_step: int):
        self.run, self.name, self.deadline, self.cap = run, name, deadline, cap
        self.warm_until = start_step + 5  # the first steps include allocation and autotuning
        self.anchor: tuple[int, float] | None = None

    def after_step(self, state: dict[str, Any], log_step: bool) -> None:
        step = state["step"]
        if self.anchor is None:
            if step >= self.warm_until:
                self.run.sync()
                self.anchor = (step, time.monotonic())
            return
        calibrating = state["planned"] is None and step - self.anchor[0] >= self.run.cfg["budget"]["calibrate_steps"]
        if not (calibrating or (log_step and state["planned"] is not None)):
            return
        self.run.sync()
        now = time.monotonic()
        per_step = (now - self.anchor[1]) / max(1, step - self.anchor[0])
        fits = max(step + 1, min(self.cap, step + int(0.97 * (self.deadline - now) / per_step)))
        if calibrating:
            state["planned"] = fits
            self.run.log(f"[{self.name}] {per_step * 1000:.1f} ms/step: planning {fits} steps")
        elif fits < state["planned"]:
            self.run.log(f"[{self.name}] slower than planned ({per_step * 1000:.1f} ms/step): {fits} steps")
            state["planned"] = fits


def train_phase(run: Run, name: str, step_fn: Callable[[int], torch.Tensor], opt: torch.optim.Optimizer,
                pcfg: dict[str, Any], state: dict[str, Any], deadline: float, save: Callable[[], None],
                stop_at: int = 0) -> bool:
    """Run steps until the planned count, the deadline or `stop_at`; state holds 'step' and 'planned'
    (None until timed; resumable). Returns whether the planned count was reached."""
    bud, cap = run.cfg["budget"], min(pcfg["max_steps"], run.args.max_steps or pcfg["max_steps"])
    pace = Pace(run, name, deadline, cap, state["step"])
    last_ckpt, last_log, last_step = time.monotonic(), time.monotonic(), state["step"]
    params = [p for g in opt.param_groups for p in g["params"]]
    planned = lambda: state["planned"] or cap  # noqa: E731
    while state["step"] < min(planned(), stop_at or cap) and time.monotonic() < deadline:
        step = state["step"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, planned(), pcfg["lr"], pcfg["warmup_steps"], pcfg.get("min_lr_ratio", 0.1))
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if pcfg.get("grad_clip"):
            torch.nn.utils.clip_grad_norm_(params, pcfg["grad_clip"])
        opt.step()
        state["step"] = step + 1
        log_step = state["step"] % bud["log_every"] == 0 or state["step"] == planned()
        pace.after_step(state, log_step)
        if log_step:
            lv = float(loss.detach())
            now = time.monotonic()
            rate = (state["step"] - last_step) / max(1e-9, now - last_log)
            run.log(f"[{name}] step {state['step']}/{planned()} loss {lv:.5f} lr {opt.param_groups[0]['lr']:.2e} "
                    f"{rate:.1f} steps/s")
            last_log, last_step = now, state["step"]
            if not math.isfinite(lv):
                raise SdtuneError(f"The {name} loss became {lv}; lower {name}.lr in the recipe and rerun.")
        if time.monotonic() - last_ckpt > bud["checkpoint_minutes"] * 60:
            save()
            last_ckpt = time.monotonic()
    state["planned"] = planned()
    save()
    return state["step"] >= state["planned"]


def fused(run: Run) -> dict[str, Any]:
    return {"fused": True} if run.device.type == "cuda" else {}


def save_ckpt(run: Run, payload: dict[str, Any]) -> None:
    payload["config"] = json.dumps(run.cfg)
    size = ck.save_checkpoint(run.ckpt_path, payload)
    run.log(f"[ckpt] {payload['phase']} step {payload['step']} -> {run.ckpt_path} ({size / 2**20:.1f} MiB)")
