"""Compare tab: open a comparison report folder and show its report, or run `sdtune compare` into a new one."""

from __future__ import annotations

import html
from pathlib import Path

from ..errors import SdtuneError
from .app import REPORT_ROUTE, UIState, notice
from .comparing import CompareStatus, compare_options, report_folders, report_summary

POLL_SECONDS = 1.0


def build(state: UIState) -> None:
    import gradio as gr

    can_run = compare_options() is not None
    with gr.Tab("Compare", id="compare", elem_id="tab-compare") as tab:
        with gr.Row():
            folder = gr.Dropdown(report_folders(state.workspace.comparisons), value=None, allow_custom_value=True,
                                 label="Report folder (holds report.html and results.json)",
                                 elem_id="cmp-folder", scale=5)
            with gr.Column(scale=1, min_width=140):
                open_button = gr.Button("Open report", variant="primary", elem_id="cmp-open")
        message = gr.HTML("" if can_run else notice("This sdtune has no compare command yet; open an existing "
                                                    "report folder instead."), elem_id="cmp-notice")
        with gr.Accordion("Run a new comparison (sdtune compare)", open=False, visible=can_run,
                          elem_id="cmp-run-section"):
            with gr.Row():
                name = gr.Textbox("comparison", label="New comparison folder (under the workspace)",
                                  elem_id="cmp-name", scale=3)
                methods = gr.Textbox("default", label="Methods (default, all, or a comma list)", elem_id="cmp-methods",
                                     scale=2)
                with gr.Column(scale=1, min_width=140):
                    run = gr.Button("Run comparison", variant="primary", elem_id="cmp-run")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cmp-cancel")
            log = gr.Textbox("", label="sdtune compare output", lines=6, max_lines=12, elem_id="cmp-log",
                             interactive=False)
        report = gr.HTML('<div class="sd-message">No report open.</div>', elem_id="cmp-report")
        results = gr.JSON(label="results.json", elem_id="cmp-results", visible=False)
        seen = gr.State("")
        timer = gr.Timer(POLL_SECONDS, active=can_run)

    tab.select(lambda: gr.Dropdown(choices=report_folders(state.workspace.comparisons)), outputs=folder)
    open_button.click(lambda path: open_report(state, path or ""), inputs=folder, outputs=[report, results, message])
    run.click(lambda text, chosen: _run(state, text or "", chosen or "default"), inputs=[name, methods],
              outputs=message)
    cancel.click(lambda: notice(state.comparer.cancel()), outputs=message)
    timer.tick(lambda last: _poll(state, last), inputs=seen, outputs=[log, message, report, results, seen])


def open_report(state: UIState, folder: str) -> tuple:
    """Serve `folder` and show its report.html in a frame (relative plots and images load with it)."""
    import gradio as gr

    try:
        if not folder.strip():
            raise SdtuneError("Choose a report folder first.")
        key = state.reports.register(folder.strip())
    except SdtuneError as exc:
        return gr.skip(), gr.skip(), notice(str(exc), error=True)
    src = f"{REPORT_ROUTE}/{key}/report.html"
    frame = (f'<iframe src="{html.escape(src)}" title="comparison report" id="cmp-frame" '
             'style="width:100%;height:720px;border:1px solid var(--border-color-primary);border-radius:8px">'
             '</iframe>')
    summary = report_summary(Path(folder.strip()))
    return frame, gr.JSON(summary, visible=summary is not None), notice(f"Opened {folder.strip()}.")


def _run(state: UIState, name: str, methods: str) -> str:
    target = state.workspace.comparisons / name.strip()
    try:
        if not name.strip() or Path(name.strip()).name != name.strip():
            raise SdtuneError("Give the new comparison folder a plain name (no slashes).")
        state.comparer.start(target, methods)
    except SdtuneError as exc:
        return notice(str(exc), error=True)
    return notice(f"Comparing into {target}…")


def _poll(state: UIState, last: str):
    import gradio as gr

    status: CompareStatus = state.comparer.status()
    key = f"{status.state}|{status.output}|{hash(status.log)}"
    if key == last:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    if status.state == "done":
        frame, results, _ = open_report(state, str(status.output))
        return status.log, notice(status.message), frame, results, key
    error = status.state == "failed"
    message = notice(status.message, error=error) if status.message else gr.skip()
    return status.log, message, gr.skip(), gr.skip(), key
