"""DreamBooth at 1 and 2 CPU processes (torchrun, gloo) on a mid-size UNet: each process's trained state,
peak memory and step time, as a markdown table (BENCHMARKS.md, "Several processes").

    python scripts/sharding_cpu.py [WORK_FOLDER]     # about 5 minutes on a 2-core machine
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS = 12
# A 4-level SD1-layout UNet (128/256/512/512 channels, 2 layers per block) beside tiny:sd1's text encoder and VAE.
MID_UNET = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=16, norm_num_groups=32,
                cross_attention_dim=32, attention_head_dim=8,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def mid_model(folder: Path) -> int:
    import torch
    from diffusers import UNet2DConditionModel

    from sdtune.model import load

    model = load("tiny:sd1")
    torch.manual_seed(0)
    model.unet = UNet2DConditionModel(**MID_UNET)
    model.pipeline().save_pretrained(folder)
    return sum(p.numel() for p in model.unet.parameters())


def subject(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        Image.new("RGB", (32, 32), colour).save(folder / f"{i}.png")
    return folder


def run(work: Path, model: Path, images: Path, processes: int, engine: str) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sdtune.artifacts import load_artifact

    out = work / f"{engine}-{processes}"
    argv = ["train", "dreambooth", "--model", str(model), "--images", str(images), "--token", "sks",
            "--steps", str(STEPS), "--lr", "1e-5", "--quiet", "--batch-size", str(2 // processes), "--output", str(out)]
    if processes > 1:
        argv += ["--distributed", engine]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launch = [torchrun, "--nproc_per_node", str(processes), "--master_port", "29571", "-m", "sdtune.cli"]
    subprocess.run(launch + argv, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, card = load_artifact(out / "sks.safetensors")
    events = EventAccumulator(str(out / "logs"))
    events.Reload()
    times = [e.wall_time for e in events.Scalars("train/loss")]
    step = statistics.median(b - a for a, b in zip(times[1:], times[2:]))  # the first step warms up
    return {"processes": processes, "engine": card["distributed"], "state": int(card["trainable_state_bytes"]),
            "peak": int(card["peak_memory_bytes"]), "step": step}


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="sharding-"))
    params = mid_model(work / "mid")
    images = subject(work / "subject")
    rows = [run(work, work / "mid", images, 1, "single"), run(work, work / "mid", images, 2, "ddp"),
            run(work, work / "mid", images, 2, "fsdp")]
    mib = 2 ** 20
    print(f"DreamBooth, UNet of {params / 1e6:.1f} M values, global batch 2, {STEPS} steps, fp32, gloo")
    print("| processes | engine | trained state per process | peak RSS per process | step time |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['processes']} | {row['engine']} | {row['state'] / mib:.0f} MiB | {row['peak'] / mib:.0f} MiB "
              f"| {row['step']:.2f} s |")


if __name__ == "__main__":
    main()
