"""THE training loop, shared by all four methods. It never asks which method it is training.

Read top to bottom: set up the device, the class images (prior preservation) and the method, prepare
examples (latents and text encoded up front and cached when possible), build the optimizer, resume if asked,
then step: freeze param groups past their stop step, draw noise per sample, predict, weigh the loss,
accumulate (several processes: parallel.py averages gradients across them, or shards them), clip, update,
average (EMA); read the loss on the host (every step on a CPU, every few on a GPU: speed.py); checkpoint,
validate, log; save.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .artifacts import atomic_write_via
from .config import DataConfig, TrainConfig, to_json
from .conditioning import Conditioning
from .errors import SdtuneError
from .loss import combine, draw_noise, min_snr_weights, per_sample_mse, training_target
from .runtime import is_main_process, make_accelerator, peak_memory_bytes
from .trainset import TrainingSet, build_training_set
from .unet_runner import UNetRunner
from . import checkpoints, class_images, faults, optimization, outputs, parallel, speed, validation_loss


@dataclass
class TrainResult:
    """What a finished run produced and what it cost."""

    paths: list[Path]
    steps: int
    wall_time: float
    peak_memory: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    speed: dict[str, str] = field(default_factory=dict)  # the speed settings as resolved for this run


def train(model, method, train_cfg: TrainConfig, data_cfg: DataConfig, out_dir: str | Path, name: str,
          fmt: str | None = None, progress: bool = True,
          on_step: Callable[[int, float], bool | None] | None = None) -> TrainResult:
    """Train `method` (a sdtune.methods.Method holding its settings) on `model` with the subject in `data_cfg`;
    write the artifact to out_dir/name.*

    `on_step(step, loss)` runs after each step (e.g. a UI's progress; `loss` is the newest one read on the
    host, see TrainConfig.sync_every); when it returns True the run stops with a checkpoint of that step
    saved, and an SdtuneError says how to resume it. Running out of device memory becomes an SdtuneError
    naming the settings that save memory, for every caller (CLI, UI, compare).

    Every path the run writes is checked before any work (outputs.py): a name that would leave `out_dir`, or a
    target sdtune did not make, is refused; the folder is locked for the run."""
    targets = outputs.plan(out_dir, name, method.output_files(name, fmt), train_cfg.log_dir)
    with outputs.claim(targets, main_process=is_main_process()), faults.memory_advice(out_dir), \
            parallel.lost_process_advice(out_dir):
        result = _train(model, method, train_cfg, data_cfg, Path(out_dir), name, fmt, progress, on_step)
        if result.paths:
            outputs.record(targets)
        return result


def _train(model, method, train_cfg: TrainConfig, data_cfg: DataConfig, out_dir: Path, name: str,
           fmt: str | None, progress: bool, on_step: Callable[[int, float], bool | None] | None) -> TrainResult:
    started = time.time()
    accelerator = make_accelerator(train_cfg)
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(train_cfg.mixed_precision, torch.float32)

    # 1. Class images come from the untouched base model; then the method decides what trains. Only
    #    then are frozen weights stored in the mixed-precision dtype, so trained ones start exact.
    noise_scheduler = model.noise_scheduler()
    timestep_range(train_cfg, noise_scheduler.config.num_train_timesteps)  # refuse a bad range before any work
    model.fingerprint()  # the base weights' identity (run card, class-image cache), before anything changes
    model.to(device)
    model.vae.to(dtype=torch.float32)  # SDXL's VAE overflows in fp16; it runs once per image anyway
    class_records = _class_images(model, data_cfg, train_cfg, out_dir, accelerator, progress)
    torch.manual_seed(train_cfg.seed)
    method.check_data(model, data_cfg)  # method-specific warnings about the data (e.g. a common token)
    param_groups = optimization.as_param_groups(method.setup(model))
    params = [p for group in param_groups for p in group["params"]]
    for param in params:
        param.data = param.data.float()  # trainable values always in fp32
    if device.type == "cuda" and not method.saves_frozen_weights:
        _store_frozen_weights(model, weight_dtype)  # an artifact holding frozen weights keeps them exact
        torch.cuda.reset_peak_memory_stats(device)  # peak memory measures training, not loading
    if train_cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    # Several processes: DDP, or FSDP sharding the trained components (their parameters are replaced).
    engine = parallel.prepare(train_cfg, data_cfg, method, model, param_groups, world, device, weight_dtype)
    params = [p for group in param_groups for p in group["params"]]
    stops = [(group.pop("stop_after"), group["params"]) for group in param_groups if group.get("stop_after")]

    # 2. Examples: latents and text conditioning computed once where nothing about them changes.
    templates = method.prompt_templates(model)
    examples = build_training_set(model, data_cfg, train_cfg, accelerator, templates, class_records,
                                  method.prompt_token(data_cfg.token))
    examples.fill_caches()  # encoders run now, not inside the first steps
    held_out = validation_loss.for_run(model, data_cfg, train_cfg, noise_scheduler, device,
                                       timestep_range(train_cfg, noise_scheduler.config.num_train_timesteps),
                                       accelerator.is_main_process)
    # Encoders the steps no longer call wait on the CPU (GPU memory for training); back before saving.
    parked = examples.idle_components() if device.type == "cuda" and not train_cfg.validation_every else []
    for component in parked:
        model.components()[component].to("cpu")
    local_batch = train_cfg.batch_size * train_cfg.grad_accum
    global_batch = local_batch * world

    # 3. Optimizer and schedule; resume restores them with the trained values, the step and the EMA
    #    (an EMA missing from an older checkpoint starts from the weights as they are then).
    lr_scale = global_batch if train_cfg.scale_lr else 1
    optimizer, lr_schedule = optimization.make_optimizer(param_groups, lr_scale, train_cfg, device)
    optimizer = accelerator.prepare(optimizer)
    start_step, losses, validation_losses = 0, [], []
    if train_cfg.resume:
        start_step, losses = checkpoints.restore(out_dir, train_cfg, method, model, optimizer, lr_schedule, engine)
    ema = optimization.ema(params, train_cfg.ema_decay, start_step)
    if ema is not None and start_step:
        checkpoints.restore_ema(out_dir, train_cfg.resume, ema)

    # The step's speed (speed.py): how the UNet runs (eager, captured CUDA graph or compiled) and how often
    # the host waits for the device to read the loss.
    unet_mode = speed.resolve_compile(train_cfg.compile, device.type, train_cfg.steps - start_step,
                                      examples.static_shapes, train_cfg.grad_accum, train_cfg.gradient_checkpointing,
                                      world > 1)
    unet = UNetRunner(model.unet, unet_mode, params, train_cfg.channels_last, strict=train_cfg.compile != "auto",
                      wrap=engine.wrap)
    loss_log = speed.LossLog(speed.sync_interval(train_cfg.sync_every, device.type, optimizer,
                                                 train_cfg.mixed_precision), optimizer, device)

    bar = _progress(train_cfg.steps, start_step, progress and accelerator.is_main_process)
    logger = _tensorboard(out_dir, train_cfg, accelerator.is_main_process)
    state_bytes = 0  # this run's largest per-process share of trained values, gradients and optimizer state
    for step in range(start_step, train_cfg.steps):
        optimization.freeze_finished_groups(stops, step)
        torch.manual_seed((train_cfg.seed * 100_003 + step) % 2**64)  # dropout etc. replay after a resume
        step_loss = torch.zeros((), device=device)
        for micro in range(train_cfg.grad_accum):
            first = step * global_batch + (micro * world + rank) * train_cfg.batch_size
            positions = list(range(first, first + train_cfg.batch_size))
            with engine.micro_batch(last=micro == train_cfg.grad_accum - 1):  # gradients synchronised once
                loss = _micro_batch_loss(unet, examples, positions, noise_scheduler, train_cfg, local_batch,
                                         accelerator)
                accelerator.backward(loss)
            step_loss += loss.detach()
        step_loss = accelerator.reduce(step_loss, "mean") if world > 1 else step_loss
        # A non-finite loss never reaches the weights: checked here when the host reads every step, else its
        # update is skipped on the device until the next read stops the run (speed.LossLog).
        _take_losses(loss_log.push(step, step_loss), losses, bar, logger, train_cfg, out_dir)
        training = [p for p in params if p.requires_grad]
        if train_cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(training, train_cfg.max_grad_norm)
        optimizer.step()
        if step == start_step:  # gradients and optimizer state all exist now
            state_bytes = parallel.most_over_processes(parallel.state_bytes(params, optimizer), device)
        lr_schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(params)

        bar.update(1)
        if logger:
            logger.add_scalar("train/lr", lr_schedule.get_last_lr()[0], step + 1)
        done = step + 1
        checkpoint_now = bool(train_cfg.checkpoint_every) and done % train_cfg.checkpoint_every == 0 \
            and done < train_cfg.steps
        validate_now = bool(train_cfg.validation_every) and done % train_cfg.validation_every == 0
        if loss_log.due(done) or checkpoint_now or validate_now or done == train_cfg.steps:
            _take_losses(loss_log.pull(), losses, bar, logger, train_cfg, out_dir)  # before anything is written
        if checkpoint_now:  # a finite loss does not rule out non-finite weights: checked before each write
            faults.check_weights(params, done, train_cfg.lr, train_cfg.weight_decay, out_dir)
        if checkpoint_now:  # every process: a sharded run writes each one's shard
            checkpoints.save(out_dir, done, method, model, optimizer, lr_schedule, losses, train_cfg, ema, engine)
        if accelerator.is_main_process and validate_now:
            _validation_image(model, examples, train_cfg, out_dir, done, logger)
        if held_out is not None and (done % held_out.every(train_cfg) == 0 or done == train_cfg.steps):
            held_out.read(accelerator.autocast, done, validation_losses, bar, logger)
        if on_step is not None and on_step(done, loss_log.latest) and done < train_cfg.steps:
            _take_losses(loss_log.pull(), losses, bar, logger, train_cfg, out_dir)
            faults.check_weights(params, done, train_cfg.lr, train_cfg.weight_decay, out_dir)
            _stop(out_dir, done, method, model, optimizer, lr_schedule, losses, train_cfg, accelerator, logger, ema)
    bar.close()
    for component in parked:
        model.components()[component].to(device)

    # 4. The artifact (the averaged weights when EMA is on), with a run card that says how it was made.
    if ema is not None:
        ema.copy_to(params)
    faults.check_weights(params, train_cfg.steps, train_cfg.lr, train_cfg.weight_decay, out_dir)
    wall = time.time() - started
    peak = parallel.most_over_processes(peak_memory_bytes(device), device)  # the fullest process's
    paths: list[Path] = []
    engine.gather(model)  # sharded weights come together once, on the main process
    if accelerator.is_main_process:
        card = run_card(method, model, train_cfg, data_cfg, wall, peak, losses, world, validation_losses)
        card.update({"distributed": engine.kind, "trainable_state_bytes": str(state_bytes)})
        paths = method.save(model, out_dir, name, card, fmt)
        resolved = json.dumps(json.loads(card["config"]), indent=1)
        atomic_write_via(out_dir / f"{name}.config.json", lambda tmp: tmp.write_text(resolved))
    accelerator.wait_for_everyone()
    if logger:
        logger.close()
    return TrainResult(paths, train_cfg.steps, wall, peak, sum(p.numel() for p in params), losses,
                       {"compile": unet.mode, "sync_every": str(loss_log.every),
                        "fused_adam": str(speed.can_skip_on_device(optimizer)).lower()})


def _take_losses(read: list[tuple[int, float]], losses: list[float], bar, logger, cfg: TrainConfig,
                 out_dir: Path) -> None:
    """Keep the losses just read on the host; stop at the first non-finite one (its update never happened)."""
    for step, value in read:
        if not math.isfinite(value):
            raise faults.diverged(step + 1, value, cfg.lr, out_dir)
        losses.append(value)
        if logger:
            logger.add_scalar("train/loss", value, step + 1)
    if read:
        bar.set_postfix(loss=f"{read[-1][1]:.4f}")


def _stop(out_dir: Path, done: int, method, model, optimizer, lr_schedule, losses: list[float],
          cfg: TrainConfig, accelerator, logger, ema=None) -> None:
    """Stop a run on request, keeping a checkpoint of the step reached so `--resume latest` continues it."""
    if accelerator.is_main_process and not (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
        checkpoints.save(out_dir, done, method, model, optimizer, lr_schedule, losses, cfg, ema)
    if logger:
        logger.close()
    raise SdtuneError(f"Training stopped at step {done} of {cfg.steps}; its checkpoint is in "
                      f"{checkpoints.folder(out_dir)} and --resume latest continues it.")


def _micro_batch_loss(unet: UNetRunner, examples: TrainingSet, positions: list[int], noise_scheduler,
                      cfg: TrainConfig, local_batch: int, accelerator) -> torch.Tensor:
    """Loss of one micro-batch, normalised by this process's share of the batch: its micro-batches sum to
    the process's mean, which the processes then average (parallel.py) into the global batch's."""
    batch = examples.batch(positions)
    latents = batch.latents.to(accelerator.device)
    count = noise_scheduler.config.num_train_timesteps
    noise, timesteps = draw_noise(tuple(latents.shape[1:]), batch.noise_positions, cfg.seed, count,
                                  cfg.offset_noise, timestep_range(cfg, count))
    noise, timesteps = speed.to_device(noise, latents.device), speed.to_device(timesteps, latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    cond: Conditioning = batch.conditioning
    with accelerator.autocast():
        pred = unet(noisy, timesteps, cond)
    losses = per_sample_mse(pred, training_target(noise_scheduler, latents, noise, timesteps))
    if cfg.min_snr_gamma:
        losses = losses * min_snr_weights(noise_scheduler, timesteps, cfg.min_snr_gamma)
    is_class = speed.to_device(batch.is_class, latents.device)
    n_class = local_batch if cfg.prior_preservation else 0
    return combine(losses, is_class, cfg.prior_loss_weight, local_batch, n_class)


def timestep_range(cfg: TrainConfig, count: int) -> tuple[int, int]:
    """The [low, high) training timesteps are drawn from: min_timestep/max_timestep within the scheduler's."""
    low, high = cfg.min_timestep, cfg.max_timestep or count
    if not low < high <= count:
        raise SdtuneError(f"min_timestep {low} / max_timestep {high} must satisfy 0 <= min < max <= {count} "
                          "(the scheduler's timestep count).")
    return low, high


def _store_frozen_weights(model, dtype: torch.dtype) -> None:
    """Frozen weights (VAE aside) in the mixed-precision dtype, to save memory; trained ones stay fp32."""
    for name, module in model.components().items():
        if name != "vae":
            for param in module.parameters():
                if not param.requires_grad:
                    param.data = param.data.to(dtype)


def _class_images(model, data_cfg: DataConfig, train_cfg: TrainConfig, out_dir: Path, accelerator, progress: bool):
    """Prior preservation's class images, topped up by the base model when short: the main process first,
    so the other processes find them cached."""
    if not train_cfg.prior_preservation:
        return None
    with accelerator.main_process_first():
        return class_images.prepare(model, data_cfg, out_dir / "class_images", progress and accelerator.is_main_process)


def run_card(method, model, train_cfg, data_cfg, wall: float, peak: int,
             losses: list[float], world_size: int = 1,
             validation_losses: list[tuple[int, float]] | None = None) -> dict[str, str]:
    """Header metadata written into every artifact."""
    card = {
        "world_size": str(world_size),
        "sdtune_version": __version__,
        "method": method.name,
        "base_model": model.source,
        "base_family": model.family,
        "base_hash": model.fingerprint(),
        "prediction_type": model.prediction_type,
        "token": data_cfg.token,
        "class_word": data_cfg.class_word,
        "steps": str(train_cfg.steps),
        "seed": str(train_cfg.seed),
        "wall_time_s": f"{wall:.2f}",
        "peak_memory_bytes": str(peak),
        "final_loss": f"{losses[-1]:.6f}" if losses else "",
        "config": to_json(data_cfg, train_cfg, method.cfg),
    }
    if validation_losses:  # (step, loss) readings on the held-out images
        card["validation_loss"] = f"{validation_losses[-1][1]:.6f}"
        card["validation_losses"] = json.dumps([[step, round(value, 6)] for step, value in validation_losses])
    card.update({f"{method.name}_{k}": v for k, v in method.metadata().items()})
    return card


def _progress(total: int, initial: int, enabled: bool):
    from .progress import bar  # a bar on a terminal, plain lines with step, loss, steps/s and ETA in a log

    return bar(total, initial, "train", "step", enabled)


def _tensorboard(out_dir: Path, cfg: TrainConfig, is_main: bool):
    if not is_main or cfg.log_dir == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional at run time
        return None
    return SummaryWriter(cfg.log_dir or str(out_dir / "logs"))


@torch.no_grad()
def _validation_image(model, examples: TrainingSet, cfg: TrainConfig, out_dir: Path, step: int, logger) -> None:
    """One image from the validation prompt with the weights as they are now."""
    prompt = cfg.validation_prompt or examples.instance_prompt
    generator = torch.Generator().manual_seed(cfg.seed)
    image = model.pipeline()(prompt, num_inference_steps=25, generator=generator).images[0]
    folder = out_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_via(folder / f"step-{step:06d}.png", image.save)
    if logger:
        import numpy as np

        logger.add_image("validation", np.asarray(image), step, dataformats="HWC")
