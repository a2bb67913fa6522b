"""Generate tab: an A1111-style prompt, an artifact picker that writes the syntax, a gallery."""

from __future__ import annotations

import time

from ..config import GENERATE_STEPS
from ..errors import SdtuneError
from .app import UIState, notice
from .library import insert_syntax, scan
from .state import unexpected


def build(state: UIState) -> None:
    import gradio as gr

    from ..generate import SCHEDULERS
    from ..methods import prompt_syntax

    with gr.Tab("Generate", id="generate", elem_id="tab-generate") as tab:
        with gr.Row():
            with gr.Column(scale=5):
                prompt = gr.Textbox("a photo of a sks circle", label="Prompt", lines=3, elem_id="gen-prompt",
                                    info=prompt_syntax())
                negative = gr.Textbox("", label="Negative prompt", elem_id="gen-negative")
                with gr.Row():
                    picker = gr.Dropdown(picker_choices(state), value=None, label="Insert an artifact",
                                         elem_id="gen-picker", scale=4)
                    with gr.Column(scale=1, min_width=100):
                        refresh = gr.Button("Refresh list", size="md", elem_id="gen-refresh")
                with gr.Row():
                    steps = gr.Number(GENERATE_STEPS, label="Steps", precision=0, minimum=1, elem_id="gen-steps")
                    guidance = gr.Number(None, label="Guidance (empty: the model's own)", elem_id="gen-guidance")
                    seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="gen-seed")
                    count = gr.Number(4, label="Images", precision=0, minimum=1, maximum=16, elem_id="gen-count")
                    scheduler = gr.Dropdown(["(model default)", *SCHEDULERS], value="(model default)",
                                            label="Scheduler", elem_id="gen-scheduler")
                run = gr.Button("Generate", variant="primary", elem_id="gen-run")
                message = gr.HTML("", elem_id="gen-notice")
            with gr.Column(scale=4):
                gallery = gr.Gallery(label="Images", columns=2, height=460, object_fit="contain",
                                     elem_id="gen-gallery")

    picker.input(lambda text, syntax: (insert_syntax(text, syntax or ""), None), inputs=[prompt, picker],
                 outputs=[prompt, picker])
    refresh.click(lambda: gr.Dropdown(choices=picker_choices(state)), outputs=picker)
    tab.select(lambda: gr.Dropdown(choices=picker_choices(state)), outputs=picker)
    run.click(lambda *values: _generate(state, *values),
              inputs=[prompt, negative, steps, guidance, seed, count, scheduler], outputs=[gallery, message])


def picker_choices(state: UIState) -> list[tuple[str, str]]:
    """(label, prompt syntax) for every artifact a prompt can name."""
    return [(entry.label, entry.syntax) for entry in scan(state.workspace.artifact_dirs()) if entry.syntax]


def _generate(state: UIState, prompt, negative, steps, guidance, seed, count, scheduler):
    """Generate on a private copy of the base model (artifacts change the model they are applied to)."""
    import gradio as gr

    from ..generate import GenerateOptions, generate, save_images

    if any(value is None for value in (steps, seed, count)) or min(steps, count) < 1:
        return gr.skip(), notice("Steps and images must be at least 1.", error=True)
    options = GenerateOptions(negative_prompt=negative or "", steps=int(steps), guidance=guidance, seed=int(seed),
                              count=int(count), scheduler="" if scheduler == "(model default)" else scheduler,
                              artifact_dirs=state.workspace.artifact_dirs())
    started = time.time()
    try:
        images = generate(state.models.fresh(), prompt or "", options)
        target = state.workspace.generations / f"{time.strftime('%Y%m%d-%H%M%S')}-seed{options.seed}.png"
        paths = save_images(images, target)
    except SdtuneError as exc:
        return gr.skip(), notice(str(exc), error=True)
    except Exception as exc:  # noqa: BLE001 - shown on the page in one line, logged in full
        return gr.skip(), notice(unexpected("Generation", exc), error=True)
    shown = paths[1:] if len(paths) > 1 else paths  # the single images, not their grid
    return ([str(p) for p in shown],
            notice(f"{len(images)} image(s), seed {options.seed}, in {time.time() - started:.1f} s; saved {paths[0]}."))
