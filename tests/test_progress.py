"""Progress people can read: an ETA priced at measured rates, plain lines (no carriage returns) when the
output is a file, losses in compare's run logs, and nothing at all with --quiet."""

from __future__ import annotations

import io

from sdtune.cli import main
from sdtune.compare.progress import CLASS, START, Board, JobWork
from sdtune.progress import Lines


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# A default builtin comparison's shape, with the per-unit costs its committed run measured on this CPU
# (the one-subject run committed in docs/compare before the four-subject benchmark: seconds per training sample
# by method; sampling from the rest of its 11 min):
# a training sample costs 4-8x a denoising step here, not the 1.5x that 3 passes against 2 would say.
START_S, STEP_S, CLASS_S = 5.0, 0.0115, 0.0115
ROWS = [("base", None, 0, 0.0), ("dreambooth", "dreambooth", 450, 0.080),
        ("dreambooth-no-prior", "dreambooth", 300, 0.071), ("textual-inversion", "textual-inversion", 300, 0.048),
        ("lora", "lora", 400, 0.094), ("hypernetwork", "hypernetwork", 300, 0.058)]
BATCH, SAMPLE_STEPS, EVAL_IMAGES, CLASS_IMAGES, CLASS_STEPS = 4, 20, 96, 56, 20


def _works() -> list[JobWork]:
    works = [JobWork("class images", {START: 1, CLASS: CLASS_IMAGES * CLASS_STEPS}, per_image=CLASS_STEPS,
                     image_kind=CLASS)]
    for name, method, steps, _ in ROWS:
        work = JobWork(name, {START: 1, "sample": EVAL_IMAGES * SAMPLE_STEPS}, per_image=SAMPLE_STEPS)
        if method:
            work.train_kind, work.per_step = f"train:{method}", BATCH
            work.units[work.train_kind] = steps * BATCH
        works.append(work)
    return works


def _simulate(board: Board, clock: FakeClock, works: list[JobWork]) -> list[tuple[float, float | None]]:
    """Run the fake comparison; returns (elapsed, ETA) after every event."""
    seen = []

    key = 0

    def tick(seconds: float, event: dict | None = None) -> None:
        clock.now += seconds
        if event:
            board.event(key, event)
        seen.append((clock.now - 1000.0, board.eta()))

    costs = {name: (steps, cost) for name, _, steps, cost in ROWS}
    for work in works:
        key = board.start(work)
        tick(START_S, {"event": "ready"})
        if work.image_kind == CLASS:  # the class-image job sends no events between ready and its end
            tick(CLASS_IMAGES * CLASS_STEPS * CLASS_S)
        else:
            steps, cost = costs[work.label]
            for step in range(1, steps + 1):
                tick(BATCH * cost, {"event": "step", "step": step, "steps": steps})
            for done in range(24, EVAL_IMAGES + 1, 24):
                tick(24 * SAMPLE_STEPS * STEP_S, {"event": "images", "done": done})
        board.finish(key)
    return seen


def test_compare_eta_from_measured_rates_is_within_half_of_the_time_left():
    clock, works = FakeClock(), _works()
    board = Board(works, enabled=False, clock=clock)
    seen = _simulate(board, clock, works)
    total = seen[-1][0]
    assert board.eta() == 0
    for share in (0.3, 0.5, 0.7):
        elapsed, eta = next((e, eta) for e, eta in seen if e >= share * total)
        left = total - elapsed
        assert eta is not None and abs(eta - left) <= 0.5 * left, (share, eta, left)


def test_compare_progress_in_a_file_is_a_few_whole_lines():
    clock, works, stream = FakeClock(), _works(), io.StringIO()
    board = Board(works, enabled=True, stream=stream, clock=clock)
    _simulate(board, clock, works)
    board.close()
    text = stream.getvalue()
    minutes = (clock.now - 1000.0) / 60
    lines = text.splitlines()
    assert "\r" not in text and len(lines) <= len(works) + minutes + 1, text
    assert lines[-1].startswith(f"[{len(works)}/{len(works)}] hypernetwork: done") and "ETA 00:00" in lines[-1]


def test_a_reused_job_is_not_taken_as_fast_work():
    clock, works = FakeClock(), _works()[:3]
    board = Board(works, enabled=False, clock=clock)
    for work in works[:2]:  # reused: no time passes, nothing is measured
        board.finish(board.start(work), "reused")
    assert board.eta() is None  # nothing measured yet: no made-up number


def test_train_lines_say_step_loss_rate_and_eta_at_most_every_tenth():
    clock, stream = FakeClock(), io.StringIO()
    lines = Lines(1000, 0, "train", "step", stream, clock)
    for step in range(1, 1001):
        clock.now += 0.5  # 2 steps/s
        lines.set_postfix(loss=f"{1 / step:.4f}")
        lines.update(1)
        if step == 100:
            assert stream.getvalue().splitlines()[-1] == \
                "train: step 100/1000, loss 0.0100, 2.00 step/s, elapsed 00:50, ETA 07:30"
    text = stream.getvalue()
    assert "\r" not in text and len(text.splitlines()) <= 10 + 500 / 60 + 1


def test_train_piped_to_a_file_writes_lines_and_quiet_writes_nothing(tmp_path, subject_dir, capsys):
    argv = ["train", "lora", "--model", "tiny:sd1", "--images", str(subject_dir), "--token", "sks", "--class-word",
            "dog", "--steps", "2", "--log-dir", "none", "--validation-every", "1"]
    assert main([*argv, "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "train: step 2/2, loss " in err and len(err.splitlines()) <= 3, err
    # --quiet silences everything, the validation images' diffusers sampling bars included
    assert main([*argv, "--output", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert (tmp_path / "b" / "validation" / "step-000002.png").is_file()


def test_compare_run_logs_hold_losses_and_the_display_is_lines(tmp_path, subject_dir, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("eval: {sample_steps: 2, images_per_prompt: 1, curve_images_per_prompt: 1, curve_points: 1,\n"
                      "       prompts: ['a photo of {token} {class_word}']}\n"
                      "rows: {lora: {train: {steps: 3, batch_size: 1}}, loha: {train: {steps: 3, batch_size: 1}},\n"
                      "       lokr: {train: {steps: 3, batch_size: 1}, lora: {rank: 4}},\n"
                      "       lora-dora: {train: {steps: 3, batch_size: 1}}}\n")  # --methods lora: its every row
    out = tmp_path / "report"
    argv = ["compare", "--model", "tiny:sd1", "--images", str(subject_dir), "--class-word", "toy", "--methods", "lora",
            "--config", str(config), "--output", str(out)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "lora seed 0: done" in err, err
    log = (out / "logs" / "lora-seed-0.log").read_text()
    assert "step 3/3 loss " in log and "%|" not in log and "\r" not in log, log
    assert main([*argv, "--quiet", "--fresh"]) == 0
    assert capsys.readouterr().err == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_compare_on_a_terminal_is_one_redrawn_bar_with_the_measured_eta():
    clock, works, stream = FakeClock(), _works(), Terminal()
    board = Board(works, enabled=True, stream=stream, clock=clock)
    _simulate(board, clock, works)
    board.close()
    text = stream.getvalue()
    assert "\r" in text and text.count("\n") <= 1 and "ETA 00:00" in text.rsplit("\r", 2)[-2]
