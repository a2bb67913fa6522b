"""`sdtune compare` end to end on tiny budgets: each run in its own process, costs that match the files,
quality columns that say when their model is missing, failed rows reported, the same seed giving the same
images and numbers, and one-line errors for bad requests."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pytest
from safetensors import safe_open

from sdtune.cli import main
from sdtune.compare.judge import Samples
from sdtune.compare.recipes import load_plan
from sdtune.compare.runner import CompareOptions, _subject_words, eval_steps, make_jobs, make_judge
from sdtune.compare.sampling import load_samples
from sdtune.compare.worker import run_row

TINY_REAL = """
eval: {sample_steps: 2, images_per_prompt: 2, curve_images_per_prompt: 1, curve_points: 2,
       prompts: ["a photo of {token} {class_word}", "a red {token} {class_word}"]}
rows:
  lora: {train: {steps: 2, batch_size: 1}}
  loha: {train: {steps: 2, batch_size: 1}}
  lokr: {train: {steps: 2, batch_size: 1}, lora: {rank: 4}}
  lora-dora: {train: {steps: 2, batch_size: 1}}
  hypernetwork: {train: {steps: 2, batch_size: 1}, hypernetwork: {sizes: "999"}}
"""


def _error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tiny_encoders import make_clip

    return make_clip(tmp_path_factory.mktemp("clip"))


def test_compare_runs_each_method_in_its_own_process_and_reports_it(tmp_path, subject_dir, clip_dir, capsys,
                                                                     monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_REAL)
    out = tmp_path / "report"
    argv = ["compare", "--model", "tiny:sd1", "--images", str(subject_dir), "--class-word", "toy",
            "--methods", "lora,hypernetwork", "--config", str(config), "--clip-model", str(clip_dir),
            "--output", str(out), "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    results = json.loads((out / "results.json").read_text())
    assert [row["name"] for row in results["rows"]] == ["base", "lora", "loha", "lokr", "lora-dora", "hypernetwork"]
    base, lora, *variants, hyper = results["rows"]  # `--methods lora` picks the LoRA method's every row
    assert [row["settings"]["lora"].get("algo", "lora") for row in variants] == ["loha", "lokr", "lora"]
    assert all(row["seeds_ok"] == 1 for row in variants)

    # Costs: from a process of its own, and equal to what the artifact holds.
    run = json.loads((out / "runs/lora/seed-0/result.json").read_text())
    assert run["pid"] != __import__("os").getpid() and run["memory_kind"] == "peak_rss"
    artifact = out / "runs/lora/seed-0" / run["artifacts"][0]
    with safe_open(str(artifact), "pt") as f:
        trained = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys()
                      if not k.endswith(".alpha"))
    assert lora["cost"]["trainable_params"]["mean"] == trained > 0
    assert lora["cost"]["artifact_bytes"]["mean"] == artifact.stat().st_size
    assert lora["cost"]["wall_time_s"]["mean"] > 0 and lora["cost"]["peak_memory_bytes"]["mean"] > 50 * 2**20
    assert base["cost"]["wall_time_s"] is None

    # Quality: CLIP columns measured on every image, DINO-based ones say why they are missing; curves.
    assert [p["step"] for p in lora["curve"]] == [1, 2] and [p["step"] for p in base["curve"]] == [0]
    assert lora["quality"]["clip_i"]["n"] == 4 and -1 <= lora["quality"]["clip_t"]["value"] <= 1
    assert lora["curve"][0]["quality"]["clip_i"]["n"] == 2
    assert lora["quality"]["dino"] is None and results["missing_metrics"]["dino"] == "no --dino-model given"
    assert hyper["seeds_ok"] == 0 and "999" in hyper["errors"][0]
    report = (out / "report.md").read_text()
    assert "**DINO** not measured: no --dino-model given." in report and "**hypernetwork** failed:" in report
    lora_line = next(line for line in report.splitlines() if line.startswith("| lora |"))
    assert lora_line.count("n/a") == 3  # DINO, prior preservation, diversity

    # The report says where the trained files are (relative to it) and how to generate with them.
    (files,) = [line for line in report.splitlines() if line.startswith("- **lora**: ")]
    assert files.startswith("- **lora**: `runs/lora/seed-0/artifact/lora.safetensors`; generate with `sdtune ")
    assert (out / "runs/lora/seed-0/artifact/lora.safetensors").is_file()
    assert not [line for line in report.splitlines() if line.startswith("- **hypernetwork**: ")]  # it failed
    command = shlex.split(files.split("generate with `sdtune ")[1].rstrip("`"))
    monkeypatch.chdir(out)  # the commands run from the report's folder
    assert main([*command, "--steps", "1"]) == 0 and (out / "lora.png").is_file()
    (out / "lora.png").unlink()
    capsys.readouterr()

    # A second compare into the same folder reuses the finished runs: same numbers, no new training.
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"][1]["quality"] == lora["quality"]
    # The report says so rather than passing this invocation's seconds off as the comparison's (the failed
    # hypernetwork run is tried again).
    assert (results["runs_reused"], again["runs_reused"], again["runs"]) == (0, 5, 6)
    assert "(5 of 6 runs reused from an earlier invocation; their times are those measured when they ran" \
        in (out / "report.md").read_text()
    assert "reused" not in report
    assert json.loads((out / "runs/lora/seed-0/result.json").read_text())["pid"] == run["pid"]
    # ... also once the folder was moved (its jobs name paths inside it).
    moved = out.rename(tmp_path / "moved")
    assert main([*argv[:-3], "--output", str(moved), "--quiet"]) == 0
    assert json.loads((moved / "runs/lora/seed-0/result.json").read_text())["pid"] == run["pid"]
    assert json.loads((moved / "results.json").read_text())["rows"][1]["quality"] == lora["quality"]


def test_same_seed_gives_the_same_images_and_numbers(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("eval: {sample_steps: 2, images_per_prompt: 2, curve_points: 1}\n"
                      "rows: {textual-inversion: {train: {steps: 2, batch_size: 1}}}\n")
    from sdtune.toyworld.subject import write_instance_images

    write_instance_images(tmp_path / "subject")
    opts = CompareOptions(output=str(tmp_path), methods="textual-inversion", config=str(config))
    token, class_word, prompts = _subject_words(opts, "builtin")
    plan = load_plan("builtin", token, class_word, opts.methods, opts.config, prompts)
    (job,) = [j for j in make_jobs(plan, opts, tmp_path / "subject", tmp_path) if j["row"] == "textual-inversion"]
    assert job["token"] == "<sks>"  # Textual Inversion learns a new word
    judge = make_judge(plan, opts, tmp_path / "subject")
    scores, images = [], []
    for attempt in ("a", "b"):
        folder = tmp_path / attempt
        folder.mkdir()
        result = run_row(job, folder)
        assert result["trainable_params"] == 128  # one vector of the builtin text encoder's width
        data = load_samples(folder / result["evaluations"][-1]["file"])
        images.append(data["subject"])
        scores.append(judge.score([Samples(0, data["subject"], data["subject_prompt"], data["class_images"],
                                           data["class_prompt"])]))
    assert np.array_equal(images[0], images[1]) and images[0].shape == (2 * len(plan.evaluation.prompts), 32, 32, 3)
    assert scores[0] == scores[1]


def test_evaluation_steps_spread_over_the_run():
    assert eval_steps(160, 3) == [53, 107, 160]
    assert eval_steps(2, 3) == [1, 2]
    assert eval_steps(0, 3) == [0]


def test_builtin_recipe_has_the_four_methods_and_prior_on_and_off():
    plan = load_plan("builtin", "sks", "circle", "all", None, ((("a {token} circle",)), ("a circle",)))
    rows = {row.name: row for row in plan.rows}
    assert {row.method for row in plan.rows} == {None, "dreambooth", "textual-inversion", "lora", "hypernetwork"}
    for name, algo in (("lora", "lora"), ("loha", "loha"), ("lokr", "lokr"), ("lora-dora", "lora")):
        assert rows[name].method == "lora" and rows[name].method_cfg.get("algo", "lora") == algo, name
    assert rows["lora-dora"].method_cfg["dora"] and not rows["lora"].method_cfg.get("dora")
    assert rows["dreambooth"].train["prior_preservation"] and not rows["dreambooth-no-prior"].train["prior_preservation"]
    assert load_plan("builtin", "sks", "circle", "dreambooth", None, (("a {token} circle",), ("a circle",))).rows[-1].name \
        == "dreambooth-no-prior"


def test_the_default_comparison_leaves_out_the_rows_only_asked_for():
    """`sdtune compare` without --methods (make demo) runs the four methods' six rows; LoHa, LoKr and DoRA run
    with --methods all or by name, so the default run keeps its time on a laptop CPU."""
    prompts = (("a {token} circle",), ("a circle",))
    default = [row.name for row in load_plan("builtin", "sks", "circle", CompareOptions("x").methods, None, prompts).rows]
    assert default == ["base", "lora", "textual-inversion", "dreambooth", "dreambooth-no-prior", "hypernetwork"]
    every = [row.name for row in load_plan("builtin", "sks", "circle", "all", None, prompts).rows]
    assert set(every) - set(default) == {"loha", "lokr", "lora-dora"}
    assert [row.name for row in load_plan("builtin", "sks", "circle", "lokr", None, prompts).rows] == ["base", "lokr"]


def test_bad_requests_are_one_line_errors(capsys, tmp_path, subject_dir):
    out = str(tmp_path / "out")
    assert "--class-word" in _error(capsys, ["compare", "--images", str(subject_dir), "--output", out])
    assert "'nonsense'" in _error(capsys, ["compare", "--methods", "lora,nonsense", "--output", out])
    assert "--seeds" in _error(capsys, ["compare", "--seeds", "0", "--output", out])
    bad = tmp_path / "bad.yaml"
    bad.write_text("rows: {lora: {train: {stepz: 3}}}\n")
    assert "lora.train.stepz" in _error(capsys, ["compare", "--config", str(bad), "--output", out])
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_row_with_its_own_class_images_keeps_them(tmp_path):
    # Rows with prior preservation share one generated set, unless a row names its own folder.
    config = tmp_path / "rows.yaml"
    config.write_text("rows:\n"
                      "  own: {method: dreambooth, data: {class_images: " + str(tmp_path / "mine") + "},"
                      " train: {prior_preservation: true}}\n"
                      "  shared: {method: dreambooth, train: {prior_preservation: true}}\n")
    opts = CompareOptions(output=str(tmp_path), methods="own,shared", config=str(config))
    token, class_word, prompts = _subject_words(opts, "builtin")
    plan = load_plan("builtin", token, class_word, opts.methods, opts.config, prompts)
    jobs = {job["row"]: job for job in make_jobs(plan, opts, tmp_path / "subject", tmp_path)}
    assert jobs["own"]["data"]["class_images"] == str(tmp_path / "mine")
    assert jobs["shared"]["data"]["class_images"] == str(tmp_path / "class_images")
    assert jobs["class-images"]["data"]["class_images"] == str(tmp_path / "class_images")


def test_a_terminated_comparison_stops_its_runs_too(tmp_path, subject_dir):
    """SIGTERM to `sdtune compare` (a scheduler's stop, `kill`) ends it and the runs it started, two at a time,
    instead of leaving them training with nobody to report to."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    config = tmp_path / "long.yaml"
    config.write_text("rows: {hypernetwork: {train: {steps: 100000, batch_size: 1}}}\n")
    compare = subprocess.Popen(
        [sys.executable, "-m", "sdtune.cli", "compare", "--model", "tiny:sd1", "--images", str(subject_dir),
         "--class-word", "toy", "--methods", "hypernetwork", "--seeds", "2", "--jobs", "2", "--config", str(config),
         "--output", str(tmp_path / "out"), "--quiet"], stderr=subprocess.PIPE, text=True)
    children = Path(f"/proc/{compare.pid}/task")
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2 or not (tmp_path / "out" / "logs" / "hypernetwork-seed-0.log").is_file():
        assert compare.poll() is None and time.monotonic() < deadline, compare.stderr.read()
        workers = [int(pid) for task in children.iterdir() for pid in (task / "children").read_text().split()]
        time.sleep(0.2)
    compare.send_signal(signal.SIGTERM)
    assert compare.wait(timeout=60) != 0
    time.sleep(2)
    for pid in workers:  # gone (or a zombie waiting for its reaper)
        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", pid
