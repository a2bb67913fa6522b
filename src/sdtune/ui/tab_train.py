"""Train tab: images (upload, folder or the builtin subject), method and main options, live progress."""

from __future__ import annotations

import html
import time
import uuid
from pathlib import Path

from ..errors import SdtuneError
from .app import UIState, notice
from .state import copy_into
from .training import TrainRequest, TrainStatus

POLL_SECONDS = 0.5
BUILTIN_SUBJECT = "builtin-subject"
# The page's own choices (the CLI's default is 0 for both): validation images to watch as it trains, and a
# checkpoint that "Resume" and Cancel keep.
CHECKPOINT_EVERY = 50
VALIDATION_EVERY = 50


def build(state: UIState) -> None:
    import gradio as gr

    from ..methods import first, registry

    shown = defaults(state.models.spec, first())
    with gr.Tab("Train", id="train", elem_id="tab-train"):
        with gr.Row():
            with gr.Column(scale=5):
                upload = gr.File(label="Upload subject images", file_count="multiple", file_types=["image"],
                                 elem_id="train-upload", height=120)
                with gr.Row():
                    folder = gr.Dropdown(state.workspace.image_folders(), value=None, allow_custom_value=True,
                                         label="Image folder (on this machine)", elem_id="train-folder", scale=4)
                    with gr.Column(scale=1, min_width=120):
                        builtin = gr.Button("Builtin subject", size="md", elem_id="train-builtin")
                with gr.Row():
                    method = gr.Dropdown(list(registry()), value=first(), label="Method", elem_id="train-method")
                    token = gr.Textbox(shown["token"], label="Token", elem_id="train-token")
                    class_word = gr.Textbox("", label="Class word", elem_id="train-class")
                    name = gr.Textbox("", label="Name (default: the token)", elem_id="train-name")
                with gr.Row():
                    steps = gr.Number(shown["steps"], label="Steps", precision=0, minimum=1, elem_id="train-steps")
                    lr = gr.Number(shown["lr"], label="Learning rate", elem_id="train-lr")
                    batch = gr.Number(shown["batch_size"], label="Batch size", precision=0, minimum=1,
                                      elem_id="train-batch")
                    seed = gr.Number(shown["seed"], label="Seed", precision=0, minimum=0, elem_id="train-seed")
                with gr.Row():
                    every = gr.Number(CHECKPOINT_EVERY, label="Checkpoint every", precision=0, minimum=0,
                                      elem_id="train-ckpt")
                    validate = gr.Number(VALIDATION_EVERY, label="Validation image every", precision=0, minimum=0,
                                         elem_id="train-validate")
                    resume = gr.Checkbox(False, label="Resume the latest checkpoint", elem_id="train-resume")
                settings = gr.Code(shown["settings"], language="yaml", label="Method settings",
                                   elem_id="train-settings", lines=6)
                with gr.Row():
                    start = gr.Button("Start training", variant="primary", elem_id="train-start")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
                message = gr.HTML("", elem_id="train-notice")
            with gr.Column(scale=4):
                progress = gr.HTML(progress_html(state.trainer.status()), elem_id="train-progress")
                plot = gr.LinePlot(loss_frame([]), x="step", y="loss", title="Training loss", height=220,
                                   y_axis_format=".2f", x_axis_format="d", elem_id="train-loss")
                gallery = gr.Gallery(label="Validation images", columns=4, height=260, object_fit="contain",
                                     elem_id="train-validation")
        seen = gr.State("")
        timer = gr.Timer(POLL_SECONDS)

    upload.upload(lambda files: _save_upload(state, files), inputs=upload, outputs=[folder, message])
    builtin.click(lambda: _builtin_subject(state), outputs=[folder, token, class_word])
    method.change(lambda name: tuple(defaults(state.models.spec, name)[key] for key in SHOWN), inputs=method,
                  outputs=[token, steps, lr, batch, seed, settings])
    inputs = [method, folder, token, class_word, name, steps, lr, batch, seed, every, validate, resume, settings]
    start.click(lambda *values: _start(state, *values), inputs=inputs, outputs=message)
    cancel.click(lambda: notice(state.trainer.cancel()), outputs=message)
    timer.tick(lambda last: _poll(state, last), inputs=seen, outputs=[progress, plot, gallery, seen])


TRAIN_SHOWN = ("steps", "lr", "batch_size", "seed")  # the train settings the form has a field for
SHOWN = ("token", *TRAIN_SHOWN, "settings")


def defaults(model: str, method: str) -> dict:
    """What the form shows for `method` on `model`: the values `sdtune train` uses without flags (one home:
    recipes.command_defaults), the method's settings as YAML the user edits."""
    import yaml

    from ..compare.recipes import command_defaults

    values = command_defaults(model, method)
    return {"token": values["data"]["token"], **{key: values["train"][key] for key in TRAIN_SHOWN},
            "settings": yaml.safe_dump(values[method], sort_keys=False)}


def _parse_settings(text: str, method: str) -> dict:
    import yaml

    try:
        values = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as exc:
        raise SdtuneError(f"The {method} settings are not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(values, dict):
        raise SdtuneError(f"The {method} settings must be a mapping of names to values.")
    return values


def _start(state: UIState, method, folder, token, class_word, name, steps, lr, batch, seed, every, validate,
           resume, settings) -> str:
    numbers = {"steps": steps, "lr": lr, "batch_size": batch, "seed": seed, "checkpoint_every": every,
               "validation_every": validate}
    missing = [key for key, value in numbers.items() if value is None]
    if missing:
        return notice(f"Give a number for {missing[0].replace('_', ' ')}.", error=True)
    request = TrainRequest(method or "", folder or "", token or "", class_word or "", name or "",
                           {**numbers, "resume": "latest" if resume else ""})
    try:
        request.method_settings = _parse_settings(settings, request.method)
        job = state.trainer.start(request)
    except SdtuneError as exc:
        return notice(str(exc), error=True)
    return notice(f"Started {job.name}: {job.total} steps into {job.out_dir}.")


def _poll(state: UIState, last: str):
    import gradio as gr

    status = state.trainer.status()
    key = f"{status.name}|{status.state}|{status.version}|{len(status.validation)}"
    if key == last:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    images = [(str(p), f"step {int(p.stem.removeprefix('step-'))}") for p in status.validation]
    return progress_html(status), loss_frame(status.losses), images, key


def progress_html(status: TrainStatus) -> str:
    """A progress bar with the step, percentage, last loss and the job's final one-line message."""
    if status.state == "idle":
        return '<div class="sd-progress" data-state="idle">No training yet.</div>'
    loss = f" · loss {status.losses[-1][1]:.4f}" if status.losses else ""
    text = (f"{html.escape(status.name)} · {status.state} · step {status.step} of {status.total} · "
            f"{status.percent}%{loss}")
    message = ""
    if status.message:
        css = "sd-message sd-error" if status.state == "failed" else "sd-message"
        prefix = "Error: " if status.state == "failed" else ""
        message = f'<div class="{css}">{prefix}{html.escape(status.message)}</div>'
    return (f'<div class="sd-progress" data-state="{status.state}" data-percent="{status.percent}">'
            f'<div class="sd-bar"><div style="width:{status.percent}%"></div></div>'
            f'<div class="sd-progress-text">{text}</div>{message}</div>')


def loss_frame(losses: list[tuple[int, float]]):
    """(step, loss) as numeric columns: an object column (what pandas makes of an empty list) turns the plot's
    axis into categories, one tick per value in sorted order, with the y axis upside down."""
    import pandas as pd

    return pd.DataFrame(losses, columns=["step", "loss"]).astype({"step": "int64", "loss": "float64"})


def _save_upload(state: UIState, files) -> tuple:
    """Copy uploaded images into a new workspace folder and select it."""
    import gradio as gr

    if not files:
        return gr.skip(), ""
    target = state.workspace.images / f"upload-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    target.mkdir(parents=True)
    try:
        for item in files:
            copy_into(Path(getattr(item, "name", item)), target)
    except SdtuneError as exc:
        return gr.skip(), notice(str(exc), error=True)
    return (gr.Dropdown(choices=state.workspace.image_folders(), value=str(target)),
            notice(f"Uploaded {len(files)} images to {target}."))


def _builtin_subject(state: UIState) -> tuple:
    """The builtin model's subject images (token sks, class word circle), written once into the workspace."""
    import gradio as gr

    from ..toyworld.subject import CLASS_WORD, TOKEN, write_instance_images

    target = state.workspace.images / BUILTIN_SUBJECT
    if not target.is_dir():
        write_instance_images(target)
    return gr.Dropdown(choices=state.workspace.image_folders(), value=str(target)), TOKEN, CLASS_WORD
