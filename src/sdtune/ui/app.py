"""The app factory: one UIState per app, the Gradio page with its four tabs, and the ASGI app serving both."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from .comparing import CompareRunner, compare_command
from .state import ModelSource, ReportFolders, Workspace
from .training import TrainingRunner

REPORT_ROUTE = "/sdtune/reports"
CSS = """
.sd-progress { font-size: 0.95rem; }
.sd-bar { height: 14px; border-radius: 7px; background: var(--neutral-200); overflow: hidden; margin: 4px 0; }
.sd-bar > div { height: 100%; background: var(--color-accent); transition: width 0.3s; }
.sd-message { color: var(--body-text-color-subdued); margin-top: 4px; }
.sd-error { color: var(--error-text-color, #b91c1c); }
#art-details textarea { font-family: var(--font-mono); font-size: 0.8rem; }
"""


@dataclass
class UIState:
    """Everything the page's handlers share; created by `create_app`, never a module global."""

    workspace: Workspace
    models: ModelSource
    trainer: TrainingRunner
    comparer: CompareRunner
    reports: ReportFolders = field(default_factory=ReportFolders)


@dataclass
class UIApp:
    """The ASGI app to serve, and the state behind it (tests and scripts reach in through it)."""

    asgi: object
    blocks: object
    state: UIState


def make_state(model: str = "builtin", workspace: str | Path = "sdtune-ui", artifact_dirs: list[str] | None = None,
               model_config: str | None = None, compare=None) -> UIState:
    """The state of one app: workspace folders, the base model, the runners.
    `compare(out_dir, methods) -> argv` overrides how a comparison starts (default: `sdtune compare`)."""
    space = Workspace(Path(workspace), [Path(d) for d in artifact_dirs or []])
    models = ModelSource(model, model_config)
    compare = compare or (lambda out, methods: compare_command(out, methods, model, model_config))
    return UIState(space, models, TrainingRunner(models, space.runs), CompareRunner(compare))


def create_app(model: str = "builtin", workspace: str | Path = "sdtune-ui", artifact_dirs: list[str] | None = None,
               model_config: str | None = None, compare=None) -> UIApp:
    """Build the state, the Gradio page and the FastAPI app that serves it plus opened report folders."""
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    state = make_state(model, workspace, artifact_dirs, model_config, compare)
    blocks = build_blocks(state)
    asgi = FastAPI()

    @asgi.get(REPORT_ROUTE + "/{key}/{relative:path}")
    def report_file(key: str, relative: str) -> FileResponse:
        path = state.reports.file(key, relative)
        if path is None:
            raise HTTPException(status_code=404)
        return FileResponse(path)

    # Only the workspace is served (generated and validation images); artifact folders are read, not served.
    asgi = gr.mount_gradio_app(asgi, blocks, path="", allowed_paths=[str(state.workspace.root)], css=CSS,
                               theme=gr.themes.Default(), footer_links=["settings"])
    return UIApp(asgi, blocks, state)


def build_blocks(state: UIState):
    """The page: Train, Generate, Compare and Artifacts tabs."""
    import gradio as gr

    from . import tab_artifacts, tab_compare, tab_generate, tab_train

    with gr.Blocks(title="sdtune", analytics_enabled=False) as blocks:
        gr.Markdown(f"### sdtune  ·  base model `{state.models.spec}`  ·  workspace `{state.workspace.root}`",
                    elem_id="sd-header")
        with gr.Tabs(elem_id="sd-tabs"):
            tab_train.build(state)
            tab_generate.build(state)
            tab_compare.build(state)
            tab_artifacts.build(state)
    return blocks


def notice(text: str, error: bool = False) -> str:
    """A one-line message for a status area; errors read exactly as the CLI prints them."""
    text = html.escape(text)
    return f'<span class="sd-error">Error: {text}</span>' if error else text
