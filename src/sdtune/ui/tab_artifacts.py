"""Artifacts tab: list what the workspace holds, inspect a file's run card, convert it, add files."""

from __future__ import annotations

from pathlib import Path

from ..errors import SdtuneError
from .app import UIState, notice
from .library import classify, scan
from .state import copy_into, unexpected

HEADERS = ["name", "kind", "layout", "file"]
PREFERRED_TARGET = "diffusers"  # the conversion offered first: the layout diffusers' own loaders read


def build(state: UIState) -> None:
    import gradio as gr

    from ..methods import conversion_targets

    targets = list(conversion_targets())
    with gr.Tab("Artifacts", id="artifacts", elem_id="tab-artifacts") as tab:
        with gr.Row(equal_height=True):
            gr.Markdown("Artifacts in the workspace (trainings, added files) and the `--artifacts` folders.")
            refresh = gr.Button("Refresh", size="sm", scale=0, min_width=100, elem_id="art-refresh")
        table = gr.Dataframe(artifact_rows(state), headers=HEADERS, interactive=False, elem_id="art-table",
                             max_height=260, wrap=True)
        with gr.Row():
            with gr.Column(scale=5):
                chosen = gr.Dropdown(artifact_choices(state), value=None, label="Artifact", elem_id="art-choice")
                details = gr.Textbox("", label="sdtune inspect", lines=14, max_lines=30, interactive=False,
                                     elem_id="art-details")
            with gr.Column(scale=4):
                target = gr.Dropdown(targets, value=PREFERRED_TARGET if PREFERRED_TARGET in targets else targets[0],
                                     label="Convert to", elem_id="art-to")
                output = gr.Textbox("", label="Output file", elem_id="art-output")
                base = gr.Textbox(state.models.spec, label="Base model whose layer names the file uses (empty: "
                                  "guess by family)", elem_id="art-base")
                convert = gr.Button("Convert", variant="primary", elem_id="art-convert")
                upload = gr.File(label="Add artifact files to the workspace", file_count="multiple",
                                 file_types=[".safetensors", ".pt", ".bin", ".ckpt"], elem_id="art-upload", height=120)
                message = gr.HTML("", elem_id="art-notice")

    def listing() -> tuple:
        return artifact_rows(state), gr.Dropdown(choices=artifact_choices(state))

    refresh.click(listing, outputs=[table, chosen])
    tab.select(listing, outputs=[table, chosen])
    chosen.change(_inspect, inputs=[chosen, target], outputs=[details, output, message])
    target.change(default_output, inputs=[chosen, target], outputs=output)
    convert.click(_convert, inputs=[chosen, output, target, base], outputs=message).then(
        listing, outputs=[table, chosen])
    upload.upload(lambda files: _add_files(state, files), inputs=upload, outputs=message).then(
        listing, outputs=[table, chosen])


def artifact_rows(state: UIState) -> list[list[str]]:
    """The table: every artifact of the workspace (trainings, comparisons, added files) and the extra folders."""
    rows = [[entry.name, entry.kind, entry.layout, _shown(state, entry.path)]
            for entry in scan(state.workspace.listed_dirs())]
    return rows or [["", "", "no artifacts yet: train one or add files", ""]]


def artifact_choices(state: UIState) -> list[tuple[str, str]]:
    """(label, path): the path relative to the workspace tells a comparison's seeds apart."""
    return [(f"{entry.name} · {entry.kind} · {_shown(state, entry.path)}", str(entry.path))
            for entry in scan(state.workspace.listed_dirs())]


def _shown(state: UIState, path: Path) -> str:
    root = state.workspace.root
    return str(path.relative_to(root) if path.is_relative_to(root) else path)


def default_output(path: str | None, target: str) -> str:
    """PATH's folder, stem + target layout, with the extension the file's method writes that layout as
    (A1111 embeddings and hypernetworks are .pt files)."""
    from ..methods import layout_of, registry

    if not path:
        return ""
    source = Path(path)
    cls = registry().get(classify(source).kind) if source.is_file() else None
    layout = layout_of(cls, target) if cls is not None else None
    return str(source.with_name(f"{source.stem}-{target}{layout.suffix if layout else '.safetensors'}"))


def _inspect(path: str | None, target: str) -> tuple:
    from ..inspection import describe_artifact

    if not path:
        return "", "", ""
    try:
        return describe_artifact(Path(path)), default_output(path, target), ""
    except SdtuneError as exc:
        return "", "", notice(str(exc), error=True)


def _convert(path: str | None, output: str, target: str, base: str) -> str:
    from ..convert import convert_file

    if not path or not (output or "").strip():
        return notice("Choose an artifact and an output file first.", error=True)
    try:
        written = convert_file(Path(path), Path(output.strip()), target, (base or "").strip() or None)
    except SdtuneError as exc:
        return notice(str(exc), error=True)
    except Exception as exc:  # noqa: BLE001 - shown on the page in one line, logged in full
        return notice(unexpected("Conversion", exc), error=True)
    return notice(f"Wrote {written}.")


def _add_files(state: UIState, files) -> str:
    if not files:
        return ""
    names = []
    try:
        for item in files:
            names.append(copy_into(Path(getattr(item, "name", item)), state.workspace.uploads).name)
    except SdtuneError as exc:
        return notice(str(exc), error=True)
    return notice(f"Added {', '.join(names)} to {state.workspace.uploads}.")
