"""`sdtune ui`: a local web UI (Gradio) to train, generate, compare and manage artifacts.

Needs the optional extra: pip install 'sdtune[ui]'. Gradio's analytics are switched off before it is imported.
"""

from __future__ import annotations

import importlib.util
import os

from ..errors import SdtuneError

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before anything imports gradio


def require_gradio() -> None:
    """Check that the UI's optional dependencies are installed."""
    if any(importlib.util.find_spec(name) is None for name in ("gradio", "fastapi", "uvicorn")):
        raise SdtuneError("The web UI needs gradio: pip install 'sdtune[ui]'.")


def serve(host: str = "127.0.0.1", port: int = 7860, model: str = "builtin", workspace: str = "sdtune-ui",
          artifact_dirs: list[str] | None = None, model_config: str | None = None) -> None:
    """Serve the UI until Ctrl-C (what `sdtune ui` runs)."""
    require_gradio()
    from .server import serve as run

    run(host, port, model, workspace, list(artifact_dirs or []), model_config)


def create_app(*args, **kwargs):
    """The app factory (see `sdtune.ui.app.create_app`), with analytics off."""
    require_gradio()
    from .app import create_app as factory

    return factory(*args, **kwargs)
