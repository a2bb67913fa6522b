"""`sdtune ui` without a browser: one training at a time, cancel keeps a checkpoint that resumes, the artifact
list and prompt syntax, report folders, comparison subprocesses, binding and the CLI's one-line errors."""

from __future__ import annotations

import socket
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sdtune.cli import main
from sdtune.errors import SdtuneError
from sdtune.ui.comparing import CompareRunner, compare_command, compare_options
from sdtune.ui.library import classify, insert_syntax, scan
from sdtune.ui.server import exposure_warning, is_loopback
from sdtune.ui.state import ModelSource, ReportFolders
from sdtune.ui.training import TrainingRunner, TrainRequest


def test_binds_locally_and_warns_about_other_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "::1", "localhost"))
    assert exposure_warning("127.0.0.1") is None
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        warning = exposure_warning(host)
        assert warning and host in warning and "no login" in warning


def test_cli_ui_reports_a_taken_port_in_one_line(capsys, tmp_path):
    pytest.importorskip("gradio")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--port", str(port), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"sdtune: error: Cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port."]
    assert main(["ui", "--port", "70000", "--workspace", str(tmp_path / "ws")]) == 2
    assert capsys.readouterr().err.startswith("sdtune: error: Port 70000 is out of range;")
    assert not (tmp_path / "ws").exists()  # nothing was created before the address was known to work


def test_one_training_at_a_time_and_cancel_keeps_a_resumable_checkpoint(tmp_path, subject_dir):
    runner = TrainingRunner(ModelSource("tiny:sd1"), tmp_path / "runs")
    request = dict(method="lora", images=str(subject_dir), token="sks", class_word="toy")
    first = runner.start(TrainRequest(**request, train={"steps": 200, "validation_every": 2}))
    with pytest.raises(SdtuneError, match=r"^A training \(sks\) is already running; wait"):
        runner.start(TrainRequest(**request, name="other", train={"steps": 3}))
    while runner.status().step < 2 and first.running:  # let it reach a validation image, then cancel
        first.thread.join(0.05)
    assert runner.cancel().startswith("Stopping sks")
    stopped = runner.wait(60)
    assert stopped.state == "cancelled"
    assert stopped.message.startswith(f"Training stopped at step {stopped.step} of 200; its checkpoint is in ")
    assert 2 <= stopped.step < 200 and [s for s, _ in stopped.losses] == list(range(1, stopped.step + 1))
    checkpoint = tmp_path / "runs" / "sks" / "checkpoints" / f"step-{stopped.step:06d}"
    assert (checkpoint / "state.json").is_file()
    assert not (tmp_path / "runs" / "sks" / "sks.safetensors").exists()
    assert stopped.validation and stopped.validation[0].name == "step-000002.png"

    resumed = runner.start(TrainRequest(**request, train={"steps": stopped.step + 2, "resume": "latest"}))
    done = runner.wait(60)
    assert done.state == "done" and resumed.step == stopped.step + 2, done.message
    assert [s for s, _ in done.losses] == [stopped.step + 1, stopped.step + 2]
    assert (tmp_path / "runs" / "sks" / "sks.safetensors").is_file()


def test_bad_settings_fail_before_training_with_the_cli_messages(tmp_path, subject_dir):
    runner = TrainingRunner(ModelSource("tiny:sd1"), tmp_path / "runs")
    with pytest.raises(SdtuneError, match="^train.steps is 0; it must be between 1 and 10000000."):
        runner.start(TrainRequest("lora", str(subject_dir), train={"steps": 0}))
    with pytest.raises(SdtuneError, match="^Unknown setting 'lora.rnak'"):
        runner.start(TrainRequest("lora", str(subject_dir), method_settings={"rnak": 4}))
    with pytest.raises(SdtuneError, match="^Choose an image folder"):
        runner.start(TrainRequest("lora", " "))
    assert runner.status().state == "idle"


def test_artifact_list_kinds_and_prompt_syntax(tmp_path):
    from safetensors.torch import save_file

    runs = tmp_path / "runs"
    (runs / "dog" / "checkpoints" / "step-000001").mkdir(parents=True)
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
            "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}
    save_file(lora, runs / "dog" / "dog.safetensors")
    save_file(lora, runs / "dog" / "checkpoints" / "step-000001" / "trainable.safetensors")
    save_file({"emb_params": torch.zeros(2, 32)}, runs / "cat-style.safetensors")
    (runs / "notes.safetensors").write_bytes(b"not a safetensors file")
    entries = {e.path.name: e for e in scan([runs, tmp_path / "absent"])}
    assert set(entries) == {"dog.safetensors", "cat-style.safetensors", "notes.safetensors"}
    assert entries["dog.safetensors"].syntax == "<lora:dog:1>"
    assert entries["cat-style.safetensors"].kind == "textual-inversion"
    assert entries["cat-style.safetensors"].syntax == "cat-style"
    assert entries["notes.safetensors"].syntax == "" and "unreadable" in entries["notes.safetensors"].layout
    assert classify(runs / "dog" / "dog.safetensors").layout.startswith("LoRA (kohya")
    prompt = insert_syntax("a dog", "<lora:dog:1>")
    assert prompt == "a dog <lora:dog:1>" and insert_syntax(prompt, "<lora:dog:1>") == prompt
    assert insert_syntax("", "cat-style") == "cat-style"


def test_report_folders_serve_only_their_own_files(tmp_path):
    reports = ReportFolders()
    with pytest.raises(SdtuneError, match="has no report.html"):
        reports.register(tmp_path)
    folder = tmp_path / "cmp"
    folder.mkdir()
    (folder / "report.html").write_text("<h1>report</h1>")
    (tmp_path / "secret.txt").write_text("no")
    key = reports.register(folder)
    assert reports.file(key, "report.html") == folder / "report.html"
    assert reports.file(key, "../secret.txt") is None
    assert reports.file(key, "missing.png") is None
    assert reports.file("0" * 16, "report.html") is None


def _fake_compare(script: str):
    """A stand-in for `sdtune compare --output DIR` (the real one may not exist in this checkout)."""
    return lambda out, methods: [sys.executable, "-c", textwrap.dedent(script), str(out), methods]


def test_comparison_runs_in_a_subprocess_and_reports_the_cli_error(tmp_path):
    ok = CompareRunner(_fake_compare("""
        import sys, pathlib, time
        out = pathlib.Path(sys.argv[1])
        print(f"training {sys.argv[2]}", flush=True)
        print("compare   5%|#  |\\rcompare  50%|## |\\rcompare 100%|###|", file=sys.stderr, flush=True)
        time.sleep(0.5)
        (out / "report.html").write_text("<h1>done</h1>")
    """))
    ok.start(tmp_path / "a", "lora,textual-inversion")
    with pytest.raises(SdtuneError, match="^A comparison is already running"):
        ok.start(tmp_path / "b")
    status = ok.wait(30)
    assert status.state == "done" and "training lora,textual-inversion" in status.log
    assert "compare 100%|###|" in status.log.splitlines() and "50%" not in status.log  # bars: latest state
    assert status.message == f"Comparison finished: {tmp_path / 'a' / 'report.html'}."

    failing = CompareRunner(_fake_compare("""
        import sys
        print("sdtune: error: Unknown method 'x'; available methods are lora.", file=sys.stderr)
        print("(a later line)", file=sys.stderr)
        sys.exit(2)
    """))
    failing.start(tmp_path / "c")
    status = failing.wait(30)
    assert status.state == "failed" and status.message == "Unknown method 'x'; available methods are lora."

    slow = CompareRunner(_fake_compare("import time; time.sleep(60)"))
    slow.start(tmp_path / "d")
    assert slow.cancel() == "Comparison cancelled."
    assert slow.wait(10).state == "cancelled"


def test_compare_command_follows_the_cli():
    options = compare_options()
    if options is None:
        with pytest.raises(SdtuneError, match="no compare command"):
            compare_command(Path("out"), "lora", "builtin")
    else:
        command = compare_command(Path("out"), " lora ", "builtin")
        assert command[1:6] == ["-m", "sdtune.cli", "compare", "--output", "out"]
        assert ("--model" not in options or command[command.index("--model") + 1] == "builtin")
        assert ("--methods" not in options or command[command.index("--methods") + 1] == "lora")
        assert "--model-config" not in command


def test_artifacts_tab_lists_trainings_and_comparisons(tmp_path):
    from safetensors.torch import save_file

    from sdtune.ui.app import make_state
    from sdtune.ui.tab_artifacts import artifact_choices, artifact_rows

    state = make_state("tiny:sd1", tmp_path / "ws")
    assert artifact_rows(state)[0][2].startswith("no artifacts yet")
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    # A UI training writes runs/NAME/NAME.*; a UI comparison writes comparisons/NAME/runs/ROW/seed-S/artifact/.
    files = ["runs/dog/dog.safetensors", *(f"comparisons/first/runs/lora/seed-{s}/artifact/lora.safetensors"
                                          for s in range(3))]
    for name in files:
        (tmp_path / "ws" / name).parent.mkdir(parents=True)
        save_file(lora, tmp_path / "ws" / name)
    assert sorted(row[3] for row in artifact_rows(state)) == sorted(files)
    assert len({label for label, _ in artifact_choices(state)}) == 4  # the seeds' files are told apart


def test_loss_chart_has_numeric_axes():
    import gradio as gr

    from sdtune.ui.tab_train import loss_frame

    plot = gr.LinePlot(loss_frame([]), x="step", y="loss")
    for losses in ([], [(1, 1.10), (2, 0.16), (3, 0.5)]):
        frame = loss_frame(losses)
        assert [str(t) for t in frame.dtypes] == ["int64", "float64"]
        # Object columns would make the plot's axes categories (a tick per value, 0.16 above 1.10).
        assert plot.postprocess(frame).datatypes == {"step": "quantitative", "loss": "quantitative"}


def ui_values(model: str, tmp_path) -> dict:
    """The UI's initial value of each form field, by elem_id."""
    from sdtune.ui.app import build_blocks, make_state

    blocks = build_blocks(make_state(model, tmp_path / "ws"))
    return {b.elem_id: getattr(b, "value", None) for b in blocks.blocks.values() if getattr(b, "elem_id", None)}


@pytest.mark.parametrize("model", ["builtin", "tiny:sd1"])
def test_ui_defaults_are_the_clis(model, tmp_path):
    from sdtune.cli import build_parser
    from sdtune.compare.recipes import training_defaults
    from sdtune.config import TrainConfig

    values = ui_values(model, tmp_path)
    generate = build_parser().parse_args(["generate", "--prompt", "a", "--output", "a.png"])
    assert values["gen-steps"] == generate.steps == 50 and values["gen-guidance"] is None is generate.guidance
    recipe = training_defaults(model, "lora").get("train", {})  # what `sdtune train lora` uses on this model
    for key, elem in (("steps", "train-steps"), ("lr", "train-lr"), ("batch_size", "train-batch"),
                      ("seed", "train-seed")):
        assert values[elem] == recipe.get(key, getattr(TrainConfig(), key)), key
    assert values["train-steps"] == (400 if model == "builtin" else 500)


def test_ui_training_uses_the_clis_defaults_for_what_the_form_does_not_show(subject_dir):
    from sdtune.ui.training import build_configs

    request = TrainRequest(method="lora", images=str(subject_dir), token="sks", class_word="toy", train={"seed": 1})
    _, lora_cfg, data_cfg, train_cfg = build_configs(request, "builtin")
    assert (train_cfg.steps, train_cfg.lr, train_cfg.seed) == (400, 0.005, 1)  # the builtin recipe, the form's seed
    assert lora_cfg.rank == 8 and data_cfg.use_captions  # settings the form has no field for
    _, lora_cfg, _, train_cfg = build_configs(request, "tiny:sd1")  # elsewhere the library's field defaults
    assert train_cfg.steps == 500
