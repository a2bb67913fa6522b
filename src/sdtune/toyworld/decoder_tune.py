"""Teach the VAE's decoder objects of two colours, with the encoder frozen.

The VAE phase sees only the captioned world (one colour per object), and a VAE trained that way decodes a
two-coloured object (such as the builtin subject) as a muddle, which would cap every personalisation
method's fidelity. This phase renders half of each batch as plain scenes and half as two-coloured ones
(quarters, halves, stripes, rings in random palette colours; captions never name them, the UNet never
sees them) and trains the decoder alone. The encoder, and so every latent the UNet is trained on, is
unchanged, which is why the phase can also run afterwards on a finished pipeline folder:

    python -m sdtune.toyworld.decoder_tune --pipeline src/sdtune/toyworld/builtin --minutes 30 --device cpu
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune.errors import SdtuneError
from sdtune.toyworld import ckpt as ck
from sdtune.toyworld import loop
from sdtune.toyworld.trainset import images_as_float, step_generator
from sdtune.toyworld.world import render_batch, sample_patterned_scenes, sample_scenes


def decoder_params(vae) -> list[torch.nn.Parameter]:
    """The parameters this phase trains: the decoder and the convolution in front of it."""
    return list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())


def mixed_batch(n: int, seed: int, share: float, size: int, device: torch.device) -> torch.Tensor:
    """n renders (uint8), a `share` of them two-coloured, drawn from `seed`."""
    k = int(round(n * share))
    return torch.cat([render_batch(sample_scenes(n - k, seed), size, device=device),
                      render_batch(sample_patterned_scenes(k, seed + 1), size, device=device)])


def decoder_phase(run: loop.Run, vae, resume: dict[str, Any] | None, budget_s: float) -> bool:
    """Train the decoder for up to budget_s seconds (or its planned steps); returns whether it finished."""
    pc, seed = run.cfg["decoder"], run.cfg["seed"]
    for p in vae.parameters():
        p.requires_grad_(False)
    params = decoder_params(vae)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=pc["lr"], weight_decay=0.0, **loop.fused(run))
    state = {"step": 0, "planned": None}
    if resume is not None and resume["phase"] == "decoder":
        vae.load_state_dict({k: v.float() for k, v in resume["vae"].items()})
        if resume["optim"]["state"]:
            ck.unpack_optimizer(opt, resume["optim"])
        state = {"step": resume["step"], "planned": run.args.max_steps or resume["planned"]}
    vae.eval()
    vae.decoder.train()

    def step_fn(step: int) -> torch.Tensor:
        g = step_generator(run.device, seed, 3, step)
        x = images_as_float(mixed_batch(pc["batch_size"], seed * 1_000_003 + 2 * step, pc["patterned_share"],
                                        run.cfg["image_size"], run.device))
        with torch.no_grad(), run.autocast:
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=run.device)
        with run.autocast:
            rec = vae.decode(z.float()).sample.float()
        return (rec - x).pow(2).mean() + 0.1 * (rec - x).abs().mean()

    def save() -> None:
        loop.save_ckpt(run, {"phase": "decoder", **state, "vae": ck.half_state(vae),
                             "optim": ck.pack_optimizer(opt)})

    run.log(f"[decoder] training from step {state['step']} for up to {budget_s:.0f}s")
    deadline = min(time.monotonic() + budget_s, run.deadline)
    done = loop.train_phase(run, "decoder", step_fn, opt, pc, state, deadline, save)
    for p in vae.parameters():
        p.requires_grad_(True)
    vae.eval()
    return done


@torch.no_grad()
def round_trip_report(vae, n: int = 200, seed: int = 4242) -> dict[str, float]:
    """How well plain scenes and the builtin subject survive encode -> decode (evaluator readings)."""
    from sdtune.toyworld import subject
    from sdtune.toyworld.evaluate import ATTRIBUTES, attribute_accuracy, read_images
    from sdtune.toyworld.subjects import vae_round_trip

    def rt(images: torch.Tensor) -> torch.Tensor:
        return vae_round_trip(vae, images)  # on the VAE's own device

    batch = sample_scenes(n, seed)
    acc = attribute_accuracy([r.as_dict() for r in read_images(rt(render_batch(batch)))],
                             [{k: getattr(batch.scene(i), k) for k in ATTRIBUTES} for i in range(n)])
    subj = subject.read_subject(rt(subject.subject_renders(n // 2, seed + 1)))
    return {**{f"plain_{k}": v for k, v in acc.items()},
            "subject_detected": float(np.mean([r.is_subject for r in subj])),
            "subject_score": float(np.mean([r.score for r in subj]))}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sdtune.toyworld.decoder_tune", description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", required=True, help="toy-world pipeline folder whose vae/ is tuned in place")
    p.add_argument("--config", help="recipe YAML (default: the packaged pretrain.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. decoder.lr=1e-3")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of the whole run")
    p.add_argument("--max-steps", type=int, default=0, help="cap on the steps (smoke tests)")
    p.add_argument("--ckpt", default=".pretrain/decoder_ckpt.pt", help="rolling checkpoint")
    p.add_argument("--resume", action="store_true", help="continue from the rolling checkpoint")
    p.add_argument("--report-dir", help="where pretrain.log goes (default: next to the checkpoint)")
    args = p.parse_args(argv)
    args.interrupt_after = 0
    args.report_dir = args.report_dir or str(Path(args.ckpt).resolve().parent)
    return args


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Tune a pipeline folder's decoder in place; returns the round-trip report after tuning."""
    from diffusers import AutoencoderKL

    from sdtune.toyworld.models import replace_component
    from sdtune.toyworld.pretrain import load_config

    args = parse_args(argv)
    vae_dir = Path(args.pipeline) / "vae"
    if not (vae_dir / "config.json").is_file():
        raise SdtuneError(f"{args.pipeline} has no vae/ folder; point --pipeline at a toy-world pipeline folder.")
    resume = ck.load_checkpoint(args.ckpt) if args.resume else None
    cfg = json.loads(resume["config"]) if resume else load_config(args.config, args.set)
    # The budget counts from this call, never from import: a long test suite may import the module early.
    run = loop.Run(args, cfg, time.monotonic())
    torch.manual_seed(cfg["seed"])
    vae = AutoencoderKL.from_pretrained(str(vae_dir)).to(run.device, torch.float32)
    run.log(f"[decoder] before: {round_trip_report(vae)}")
    budget = max(0.0, run.deadline - time.monotonic() - 30)  # 30 s kept for the report and the write
    if resume is None:
        resume = {"phase": "decoder", "step": 0, "planned": None, "vae": ck.half_state(vae),
                  "optim": {"state": {}, "param_groups": []}}
    decoder_phase(run, vae, resume, budget)
    vae.load_state_dict({k: v.half().float() for k, v in vae.state_dict().items()})  # as it will be saved
    report = round_trip_report(vae)
    run.log(f"[decoder] after: {report}")
    replace_component(args.pipeline, "vae", vae)
    run.log(f"[decoder] wrote {vae_dir}")
    return report


if __name__ == "__main__":
    try:
        main()
    except SdtuneError as e:
        raise SystemExit(f"error: {e}")
