"""Serving the app with uvicorn: blocking for `sdtune ui`, or on a thread that a test or script stops."""

from __future__ import annotations

import ipaddress
import sys
import threading
import time
from dataclasses import dataclass

from ..errors import SdtuneError

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str) -> str | None:
    """The warning printed when the UI listens beyond this machine (it has no login)."""
    if is_loopback(host):
        return None
    return (f"sdtune: warning: listening on {host} lets other machines use this UI, which has no login and "
            "reads and writes files as you; use --host 127.0.0.1 to keep it local.")


def _uvicorn_server(asgi, host: str, port: int):
    import uvicorn

    _check_range(port)
    config = uvicorn.Config(asgi, host=host, port=port, log_level="warning", lifespan="on", ws="none")
    return uvicorn.Server(config)


@dataclass
class RunningServer:
    """A server on a background thread; `url` is where a browser reaches it, `stop()` ends it."""

    server: object
    thread: threading.Thread
    url: str

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)


def start_in_thread(asgi, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Start serving `asgi` on a daemon thread and wait (bounded) until it accepts connections."""
    server = _uvicorn_server(asgi, host, port)
    thread = threading.Thread(target=server.run, name="sdtune-ui-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise SdtuneError(f"The UI server could not start on {host}:{port}; is the port already in use?")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(server, thread, f"http://{_url_host(host)}:{bound}/")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def serve(host: str, port: int, model: str, workspace: str, artifact_dirs: list[str],
          model_config: str | None = None) -> None:
    """`sdtune ui`: build the app and serve it until Ctrl-C."""
    from .app import create_app

    warning = exposure_warning(host)
    if warning:
        print(warning, file=sys.stderr)
    port = _free_port(host, port)  # a taken port fails before the slow part
    app = create_app(model, workspace, artifact_dirs, model_config)
    server = _uvicorn_server(app.asgi, host, port)
    print(f"sdtune ui: http://{_url_host(host)}:{port}/ (workspace {app.state.workspace.root}); Ctrl-C stops it",
          file=sys.stderr)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.started:
            raise
        raise SdtuneError(f"The UI server could not start on {host}:{port}; choose another --port.") from None


def _check_range(port: int) -> None:
    if not 0 <= port <= 65535:
        raise SdtuneError(f"Port {port} is out of range; choose one between 1 and 65535 (0 picks a free one).")


def _free_port(host: str, port: int) -> int:
    """`port` (or a free one for 0), failing with one sentence, before uvicorn logs its own, when the address
    cannot be bound."""
    import socket

    _check_range(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise SdtuneError(f"Cannot listen on {host}: {exc.strerror}; give an address of this machine.") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise SdtuneError(f"Cannot listen on {host}:{port} ({exc.strerror}); choose another --port.") from None
        return probe.getsockname()[1]
