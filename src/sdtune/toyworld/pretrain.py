"""Pretrain the builtin toy-world model: VAE, then its decoder on two-coloured objects, then text encoder +
UNet on captions.

    python -m sdtune.toyworld.pretrain --device cuda --minutes 7 --out OUT/builtin [--pack] [--resume]

The whole run fits a wall-clock budget (--minutes, counted from start-up): after the data is rendered,
`budget.vae_fraction` of the training time goes to the VAE, `budget.decoder_fraction` to the decoder phase
(see decoder_tune) and the rest to the UNet phase; each phase times its first steps and then fixes the step
count that fits (its cosine schedule ends there), shrinking it if the steps slow down. One rolling
checkpoint (fp16 weights + 8-bit Adam moments) is rewritten every few minutes and at each phase's end, so
`--resume` continues an interrupted run; the encoded latents are cached beside it, so a run resumed in the
UNet phase does not render and encode its images again (minutes on a CPU). The result is an fp16
StableDiffusionPipeline folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tarfile
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from sdtune.errors import SdtuneError
from sdtune.toyworld import ckpt as ck
from sdtune.toyworld import loop
from sdtune.toyworld import models
from sdtune.toyworld import trainset as ts
from sdtune.toyworld.captions import write_tokenizer
from sdtune.toyworld.decoder_tune import decoder_phase

DEFAULT_CKPT_DIR = Path(".pretrain")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> dict[str, Any]:
    """The YAML recipe (the packaged default when path is None) with `a.b=value` overrides applied."""
    text = Path(path).read_text() if path else resources.files("sdtune.toyworld").joinpath(
        "pretrain.yaml").read_text()
    cfg = yaml.safe_load(text)
    for item in overrides:
        key, _, value = item.partition("=")
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
            if node is None:
                break
        if not isinstance(node, dict) or leaf not in node:
            raise SdtuneError(f"Unknown config key {key!r}; see sdtune/toyworld/pretrain.yaml for the keys.")
        node[leaf] = _parse_value(value)
    return cfg


def _parse_value(text: str) -> Any:
    """YAML value, except that "1e6"-style numbers (strings to YAML 1.1) become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def vae_phase(run: loop.Run, vae, data: ts.TrainSet, resume: dict[str, Any] | None) -> None:
    """Train the autoencoder on reconstruction with a light KL pull towards N(0, 1)."""
    pc, seed = run.cfg["vae"], run.cfg["seed"]
    opt = torch.optim.AdamW(vae.parameters(), lr=pc["lr"], weight_decay=0.0, **loop.fused(run))
    state = {"step": 0, "planned": None}
    if resume:
        vae.load_state_dict({k: v.float() for k, v in resume["vae"].items()})
        ck.unpack_optimizer(opt, resume["optim"])
        state = {"step": resume["step"], "planned": run.args.max_steps or resume["planned"]}
    vae.train()

    def step_fn(step: int) -> torch.Tensor:
        g = ts.step_generator(run.device, seed, 1, step)
        idx = torch.randint(0, len(data), (pc["batch_size"],), generator=g, device=run.device)
        x = ts.images_as_float(data.images[idx])
        with run.autocast:
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=run.device)
            rec = vae.decode(z).sample.float()
        mean, logvar = post.mean.float(), post.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).mean()
        return (rec - x).pow(2).mean() + 0.1 * (rec - x).abs().mean() + pc["kl_weight"] * kl

    def save() -> None:
        loop.save_ckpt(run, {"phase": "vae", **state, "vae": ck.half_state(vae), "optim": ck.pack_optimizer(opt)})

    budget_end = time.monotonic() + run.cfg["budget"]["vae_fraction"] * run.train_seconds
    run.log(f"[vae] training from step {state['step']} for up to {budget_end - time.monotonic():.0f}s")
    loop.train_phase(run, "vae", step_fn, opt, pc, state, budget_end, save)
    vae.eval()


def autoencoder_phases(run: loop.Run, vae, data: ts.TrainSet | None, resume: dict[str, Any] | None) -> None:
    """VAE phase, then the decoder phase (see decoder_tune); the VAE ends rounded to fp16, as it is saved."""
    phase = resume["phase"] if resume else "vae"
    if phase == "vae":
        vae_phase(run, vae, data, resume)
    elif phase in ("decoder", "unet", "done"):
        vae.load_state_dict({k: v.float() for k, v in resume["vae"].items()})
    vae.load_state_dict({k: v.half().float() for k, v in vae.state_dict().items()})
    if phase in ("vae", "decoder"):
        decoder_phase(run, vae, resume if phase == "decoder" else None,
                      run.cfg["budget"]["decoder_fraction"] * run.train_seconds)
        vae.load_state_dict({k: v.half().float() for k, v in vae.state_dict().items()})


def unet_phase(run: loop.Run, text_encoder, unet, data: ts.TrainSet, sched, resume: dict[str, Any] | None) -> bool:
    """Train text encoder + UNet on precomputed latents and sampled captions (v or epsilon target)."""
    pc, seed = run.cfg["unet"], run.cfg["seed"]
    params = list(text_encoder.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=pc["lr"], weight_decay=pc["weight_decay"], **loop.fused(run))
    state = {"step": 0, "planned": None}
    if resume and resume["phase"] == "unet":
        text_encoder.load_state_dict({k: v.float() for k, v in resume["text_encoder"].items()})
        unet.load_state_dict({k: v.float() for k, v in resume["unet"].items()})
        if resume["optim"]["state"]:
            ck.unpack_optimizer(opt, resume["optim"])
        state = {"step": resume["step"], "planned": run.args.max_steps or resume["planned"]}
    text_encoder.train()
    unet.train()
    alphas = sched.alphas_cumprod.to(run.device, torch.float32)
    v_pred = sched.config.prediction_type == "v_prediction"
    n_t = sched.config.num_train_timesteps

    def step_fn(step: int) -> torch.Tensor:
        g = ts.step_generator(run.device, seed, 2, step)
        idx = torch.randint(0, len(data), (pc["batch_size"],), generator=g, device=run.device)
        x0 = data.latents[idx].float()
        ids = ts.sample_captions(data, idx, g, run.cfg["captions"])
        noise = torch.randn(x0.shape, generator=g, device=run.device)
        t = torch.randint(0, n_t, (x0.shape[0],), generator=g, device=run.device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = a.sqrt() * noise - (1 - a).sqrt() * x0 if v_pred else noise
        with run.autocast:
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, cond).sample.float()
        return (pred - target).pow(2).mean()

    def save() -> None:
        loop.save_ckpt(run, {"phase": "unet", **state, "vae_scale": run.scaling_factor, "vae": run.vae_half,
                    "text_encoder": ck.half_state(text_encoder), "unet": ck.half_state(unet),
                    "optim": ck.pack_optimizer(opt)})

    run.log(f"[unet] training from step {state['step']} for up to {run.deadline - time.monotonic():.0f}s")
    return loop.train_phase(run, "unet", step_fn, opt, pc, state, run.deadline, save, run.args.interrupt_after)


def unet_inputs(run: loop.Run, vae, tokenizer, data: ts.TrainSet | None) -> ts.TrainSet:
    """The UNet phase's latents: from the cache a finished encoding left beside the checkpoint (a resumed
    chunk), else rendered (when not yet) and encoded now, then cached. Sets run.scaling_factor."""
    cache = run.ckpt_path.with_name(run.ckpt_path.stem + "_latents.pt")
    key = ts.latents_key(run.cfg, run.vae_half)
    if data is None:
        cached = ts.load_latents(cache, key, run.device)
        if cached is not None:
            data, run.scaling_factor = cached
            run.log(f"[latents] {tuple(data.latents.shape)} from {cache}")
            return data
        data = ts.build_trainset(run.cfg, tokenizer, run.device, run.log)
    with torch.no_grad():
        run.scaling_factor = ts.encode_latents(vae, data, chunk=run.cfg["render_chunk"], log=run.log)
    ts.save_latents(cache, data, key, run.scaling_factor)
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdtune.toyworld.pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="recipe YAML (default: the packaged pretrain.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. unet.lr=5e-4")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=7.0, help="wall-clock budget of the whole run")
    p.add_argument("--max-steps", type=int, default=0, help="cap on each phase's steps (smoke tests)")
    p.add_argument("--out", required=True, help="pipeline folder to write")
    p.add_argument("--pack", action="store_true", help="write OUT.tar instead of the folder (one file)")
    p.add_argument("--report-dir", help="where pretrain.log and the closing check go (default: OUT's parent)")
    p.add_argument("--ckpt", default=str(DEFAULT_CKPT_DIR / "pretrain_ckpt.pt"), help="rolling checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the rolling checkpoint")
    p.add_argument("--interrupt-after", type=int, default=0, metavar="STEP",
                   help="stop the UNet phase at this step as if interrupted (write the pipeline; --resume goes on)")
    args = p.parse_args(argv)
    if args.report_dir is None:
        args.report_dir = str(Path(args.out).resolve().parent)
    return args


def main(argv: list[str] | None = None, started: float | None = None) -> Path:
    """Run the recipe; returns the pipeline folder (or its .tar with --pack)."""
    from diffusers import DDPMScheduler

    args = parse_args(argv)
    resume = None
    if args.resume:
        if not Path(args.ckpt).exists():
            raise SdtuneError(f"No checkpoint at {args.ckpt}; run without --resume first.")
        resume = ck.load_checkpoint(args.ckpt)
    cfg = json.loads(resume["config"]) if resume else load_config(args.config, args.set)
    # The budget counts from this call, never from import: a long test suite may import the module early.
    run = loop.Run(args, cfg, time.monotonic() if started is None else started)
    run.log(f"[start] device {run.device} budget {args.minutes} min, resume from "
            f"{resume['phase'] + ' step ' + str(resume['step']) if resume else 'nothing'}")
    run.log(f"[config] {json.dumps(cfg)}")
    if run.device.type == "cuda":
        run.log(f"[device] {torch.cuda.get_device_name()} torch {torch.__version__}")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    tok_dir = run.ckpt_path.parent / "tokenizer"
    write_tokenizer(tok_dir)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(cfg["seed"])
    m = cfg["model"]
    latent_size = cfg["image_size"] // 2 ** (len(m["vae_channels"]) - 1)
    vae = models.build_vae(m, cfg["image_size"]).to(run.device)
    text_encoder = models.build_text_encoder(m, tokenizer).to(run.device)
    unet = models.build_unet(m, latent_size).to(run.device)
    sizes = {k: sum(p.numel() for p in mod.parameters()) / 1e6
             for k, mod in (("vae", vae), ("text_encoder", text_encoder), ("unet", unet))}
    run.log("[model] params (M): " + ", ".join(f"{k} {v:.2f}" for k, v in sizes.items()))
    sched_cfg = models.scheduler_config(cfg["schedule"])
    in_unet_phase = resume is not None and resume["phase"] in ("unet", "done")
    data = None if in_unet_phase else ts.build_trainset(cfg, tokenizer, run.device, run.log)
    run.train_seconds = max(0.0, run.deadline - time.monotonic())
    autoencoder_phases(run, vae, data, resume)
    if resume is not None and resume["phase"] in ("vae", "decoder"):
        resume = None
    run.vae_half = ck.half_state(vae)
    data = unet_inputs(run, vae, tokenizer, data)
    vae.register_to_config(scaling_factor=run.scaling_factor)
    if resume is None:
        loop.save_ckpt(run, {"phase": "unet", "step": 0, "planned": None, "vae_scale": run.scaling_factor,
                    "vae": run.vae_half, "text_encoder": ck.half_state(text_encoder),
                    "unet": ck.half_state(unet), "optim": {"state": {}, "param_groups": []}})
    finished = True
    if resume is None or resume["phase"] == "unet":
        try:
            finished = unet_phase(run, text_encoder, unet, data, DDPMScheduler.from_config(sched_cfg), resume)
            resume = None
        except SdtuneError as e:  # keep the last good checkpoint's weights rather than losing the run
            run.log(f"[unet] stopped: {e} Writing the last checkpoint's weights.")
            resume, finished = ck.load_checkpoint(run.ckpt_path), False
    if resume is not None:
        text_encoder.load_state_dict({k: v.float() for k, v in resume["text_encoder"].items()})
        unet.load_state_dict({k: v.float() for k, v in resume["unet"].items()})
    del data
    out = models.save_pipeline(args.out, vae, text_encoder, unet, tok_dir, sched_cfg)
    if finished:
        loop.save_ckpt(run, {"phase": "done", "step": 0, "planned": 0, "vae_scale": run.scaling_factor,
                    "vae": run.vae_half, "text_encoder": ck.half_state(text_encoder), "unet": ck.half_state(unet)})
    run.log(f"[out] pipeline folder {out}" + ("" if finished else " (unfinished: --resume continues)"))
    return _finish(run, out)


def _finish(run: loop.Run, out: Path) -> Path:
    """Optionally pack the folder into one .tar, then run the closing check (its failure is only logged)."""
    tar_path = out.with_name(out.name + ".tar")
    if run.args.pack:
        with tarfile.open(tar_path, "w") as tar:
            tar.add(out, arcname=out.name)
        run.log(f"[out] packed as {tar_path} ({tar_path.stat().st_size / 2**20:.1f} MiB)")
    if run.cfg["budget"]["eval_images"]:
        from sdtune.toyworld.check import closing_check

        try:
            closing_check(out, Path(run.args.report_dir), run.cfg["budget"]["eval_images"], run.device, run.log,
                          held_out=bool(run.cfg.get("hold_out_combinations")))
        except Exception as e:  # noqa: BLE001 - the weights are already safe; report and go on
            run.log(f"[check] failed: {type(e).__name__}: {e}")
    if run.args.pack:
        shutil.rmtree(out)
        out = tar_path
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if run.device.type == "cuda" else ""
    run.log(f"[done]{peak}")
    return out

if __name__ == "__main__":
    try:
        main()
    except SdtuneError as e:
        raise SystemExit(f"error: {e}")
