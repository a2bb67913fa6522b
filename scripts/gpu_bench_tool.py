"""Helpers for scripts/gpu_bench.sh: subject images, one JSON line per step, and the closing summary.

    python3 scripts/gpu_bench_tool.py images DIR PIXELS
    python3 scripts/gpu_bench_tool.py record STEP RC BENCH_JSON_FILE        >> results.jsonl
    python3 scripts/gpu_bench_tool.py tta PHASE RC T0 T1 OUTPUT_DIR          >> results.jsonl
    python3 scripts/gpu_bench_tool.py summary results.jsonl                  > summary.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# diffusers 0.42.1 example scripts, random-init SD1.5, 512 px, bf16, one H200 (FINDINGS.md): steps/s, GiB.
PEER = {("dreambooth", 1): (5.41, 16.6), ("lora", 1): (7.86, 3.14), ("lora", 4): (7.01, 6.26),
        ("textual-inversion", 1): (11.72, 3.65)}
TARGET_STEPS_PER_S = {"dreambooth": 16, "lora": 30, "textual-inversion": 35}
TARGET_MFU, TARGET_WARM_TTA_S = 0.30, 75


def record(step: str, rc: str, path: str) -> str:
    """A bench step's outcome as one JSON line (its result, or why there is none)."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else None
    return json.dumps({"step": step, "rc": int(rc), "result": result})


def tta(phase: str, rc: str, t0: str, t1: str, out_dir: str) -> str:
    """A `sdtune train` run's time to artifact, with the run card's own wall time and the artifact size."""
    from safetensors import safe_open

    files = sorted(Path(out_dir).glob("*.safetensors"))
    card = {}
    if files:
        with safe_open(str(files[0]), "pt") as f:
            card = f.metadata() or {}
    return json.dumps({"step": f"tta-{phase}", "rc": int(rc), "seconds": float(t1) - float(t0),
                       "artifact_bytes": sum(f.stat().st_size for f in files), "steps": card.get("steps"),
                       "train_wall_s": card.get("wall_time_s"), "peak_bytes": card.get("peak_memory_bytes"),
                       "final_loss": card.get("final_loss")})


def _loss_gap(eager: list[float], other: list[float]) -> float:
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(eager, other)) if eager and other else float("nan")


def summary(path: str) -> str:
    """Markdown: every run, eager-vs-graph loss agreement, time to artifact, and the targets met or missed."""
    entries = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    lines = ["| step | method | UNet | bs | px | steps/s | ms/step | peak GiB | TFLOP/step | MFU | first step s | "
             "artifact MB | note |", "|" + "---|" * 13]
    runs, checks = [], []
    for entry in entries:
        result = entry.get("result") or {}
        if entry["step"].startswith("tta"):
            continue
        if not result:
            lines.append(f"| {entry['step']} | | | | | | | | | | | | no result (rc {entry['rc']}) |")
        for run in result.get("runs", []):
            runs.append((entry["step"], run))
            if run["error"]:
                lines.append(f"| {entry['step']} | {run['method']} | {run['compile']} | {run['batch_size']} | | | | | | "
                             f"| | | {run['error'][:120]} |")
                continue
            peer = PEER.get((run["method"], run["batch_size"]))
            note = f"peer {peer[0]} steps/s, {peer[1]} GiB" if peer and run["resolution"] == 512 else ""
            lines.append(f"| {entry['step']} | {run['method']} | {run['compile']}->{run['compile_used']} | "
                         f"{run['batch_size']} | {run['resolution']} | {run['steps_per_s']:.2f} | "
                         f"{run['ms_per_step']:.1f} | {run['peak_gib']:.2f} | {run['tflop_per_step']:.3f} | "
                         f"{run.get('mfu', 0):.1%} | {run['first_step_s']:.1f} | {run['artifact_bytes'] / 1e6:.1f} | "
                         f"{note} |")
    for step, run in runs:  # eager and another mode of one method in one step: did they train alike?
        if run["compile"] == "off" and not run["error"]:
            for other_step, other in runs:
                if other_step == step and other["method"] == run["method"] and other is not run and not other["error"]:
                    checks.append(f"- {step} {run['method']}: losses off vs {other['compile']}->{other['compile_used']}"
                                  f" differ by at most {_loss_gap(run['losses'], other['losses']):.2e} (relative)")
    ttas = [e for e in entries if e["step"].startswith("tta")]
    tta_lines = [f"- {e['step']}: {e['seconds']:.1f} s to artifact (rc {e['rc']}; {e['steps']} steps; train() wall "
                 f"{e['train_wall_s']} s; artifact {e['artifact_bytes'] / 1e6:.2f} MB)" for e in ttas]
    return "\n".join(lines + ["", "Loss agreement:"] + checks + ["", "Time to artifact:"] + tta_lines + ["", "Targets:"]
                     + _targets(runs, ttas)) + "\n"


def _targets(runs: list, ttas: list) -> list[str]:
    best: dict[tuple[str, int], dict] = {}
    for _, run in runs:
        key = (run["method"], run["batch_size"])
        if not run["error"] and run.get("resolution") == 512 and (key not in best or
                                                                   run["steps_per_s"] > best[key]["steps_per_s"]):
            best[key] = run
    out = []
    for method, target in TARGET_STEPS_PER_S.items():
        run = best.get((method, 1))
        if run:
            peer_gib = PEER[(method, 1)][1]
            out.append(f"- {method} bs1: {run['steps_per_s']:.2f} steps/s (target {target}), peak {run['peak_gib']:.2f}"
                       f" GiB (peer {peer_gib}): {'met' if run['steps_per_s'] >= target and run['peak_gib'] <= peer_gib else 'MISSED'}")
    hyper, lora = best.get(("hypernetwork", 1)), best.get(("lora", 1))
    if hyper and lora:
        out.append(f"- hypernetwork bs1 {hyper['steps_per_s']:.2f} vs LoRA {lora['steps_per_s']:.2f} steps/s: "
                   f"{'met' if hyper['steps_per_s'] >= lora['steps_per_s'] else 'MISSED'}")
    big = best.get(("lora", 16))
    if big and big.get("mfu"):
        out.append(f"- LoRA bs16 MFU {big['mfu']:.1%} (target {TARGET_MFU:.0%}): "
                   f"{'met' if big['mfu'] >= TARGET_MFU else 'MISSED'}")
    warm = [e for e in ttas if e["step"] == "tta-warm" and e["rc"] == 0]
    if warm:
        out.append(f"- {warm[0]['steps']}-step LoRA warm time to artifact {warm[0]['seconds']:.1f} s "
                   f"(target {TARGET_WARM_TTA_S} s for 1,000): "
                   f"{'met' if warm[0]['seconds'] <= TARGET_WARM_TTA_S else 'MISSED'}")
    return out


def images(folder: str, pixels: str) -> str:
    sys.path.insert(0, "src")
    from sdtune.bench import write_synthetic_images

    return str(write_synthetic_images(Path(folder), int(pixels)))


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    print({"record": record, "tta": tta, "summary": summary, "images": images}[command](*args))
