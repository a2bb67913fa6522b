"""`sdtune bench`: real training steps timed and counted, full-scale artifact sizes, scaling rows."""

from __future__ import annotations

import json

from sdtune.bench import BenchSpec, run_bench
from sdtune.bench_report import scaling
from sdtune.bench_sizes import artifact_sizes
from sdtune.cli import main
from sdtune.methods import registry


def test_bench_times_and_counts_the_real_step_of_every_method(tmp_path, capsys):
    code = main(["bench", "--json", "--model", "tiny:sd1", "--method", "all", "--steps", "2", "--warmup", "1",
                 "--output", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["machine"]["device"].startswith("cpu") and result["ceiling_tflops"] > 0
    runs = {run["method"]: run for run in result["runs"]}
    assert set(runs) == set(registry())
    for name, run in runs.items():
        assert run["error"] is None, run["error"]
        assert run["steps_per_s"] > 0 and run["peak_gib"] > 0 and 0 < run["mfu"] < 1
        assert len(run["losses"]) == 1 + 2 + 1  # warm-up, timed, counted: the loop's own steps
        assert run["artifact_bytes"] > 0 and (tmp_path / name).is_dir()
    # Full fine-tuning also computes every UNet weight's gradient: its step is the costliest.
    flops = {name: run["tflop_per_step"] for name, run in runs.items()}
    assert flops["dreambooth"] == max(flops.values()) and min(flops.values()) > 0


def test_counted_flops_grow_with_the_batch():
    one, four = (run_bench(BenchSpec(batch_size=b, steps=1, warmup=1))["runs"][0] for b in (1, 4))
    assert abs(four["tflop_per_step"] / one["tflop_per_step"] - 4) < 0.2


def test_full_scale_artifact_sizes_come_from_the_real_architecture_without_its_memory():
    rows = {row["method"]: row for row in artifact_sizes("random:sd15", list(registry()))["rows"]}
    lora = rows["lora"]
    assert lora["trainable_params"] == 797_184  # r4 on SD1.5's attention projections
    assert 4 * lora["trainable_params"] < lora["bytes"] < 4 * lora["trainable_params"] + 2**17  # fp32 + header
    assert rows["dreambooth"]["files"]["dreambooth/unet"] == 4 * 859_520_964  # the whole UNet in fp32
    assert rows["dreambooth"]["bytes"] > 2**30 > 10 * 2**20 < rows["hypernetwork"]["bytes"] < 2**27
    assert 2**20 < lora["bytes"] < 10 * 2**20 and 2**10 < rows["textual-inversion"]["bytes"] < 2**14


def test_scaling_rows_run_each_in_their_own_process():
    result = scaling(BenchSpec(steps=1, warmup=1, device="cpu"), resolutions=[32], batch_sizes=[2])
    [row] = result["rows"]
    assert row.get("error") is None, row
    assert (row["resolution"], row["batch_size"]) == (32, 2) and row["ms_per_step"] > 0 and row["peak_gib"] > 0
    assert result["machine"]["device"].startswith("cpu")


def test_synthetic_images_for_a_large_batch_are_all_drawn_and_distinct(tmp_path):
    # bs16 on the H200 crashed here: the disc's edges crossed from the 9th image on.
    from PIL import Image

    from sdtune.bench import write_synthetic_images

    folder = write_synthetic_images(tmp_path, 64, 16)
    pictures = [Image.open(path).tobytes() for path in sorted(folder.glob("*.png"))]
    assert len(pictures) == 16
    assert len(set(pictures)) == 16
