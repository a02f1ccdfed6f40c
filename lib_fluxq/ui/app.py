"""``python -m lib_fluxq ui``: the Flux Quant tab as a standalone web app (same Blocks as the WebUI tab).

Binds 127.0.0.1 by default: the page can download files and write into your models folder, so it is not exposed to
the network unless you pass ``--host 0.0.0.0`` yourself.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import stat
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from lib_fluxq.errors import FluxqError

if TYPE_CHECKING:  # gradio is imported only when the app is built
    import gradio as gr

QUEUE_SIZE = 100   # requests waiting for gradio's workers; beyond, gradio answers "queue is full"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# gradio 4.40's page template loads iframe-resizer from cdnjs and preconnects to Google Fonts
_EXTERNAL_TAGS = re.compile(rb'<script\b[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>|'
                            rb'<link\b[^>]*\bhref="https?://[^"]*"[^>]*/?>', re.S)
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]]


class OfflinePage:
    """ASGI middleware: the page itself without gradio's external references. Offline they are console errors
    (``ERR_NAME_NOT_RESOLVED``); online they tell a CDN and Google that the page was opened. The app needs neither:
    it is not embedded in an iframe, and its theme uses system fonts."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or scope.get("method") != "GET" or scope.get("path", "").rstrip("/") != "":
            await self.app(scope, receive, send)
            return
        start: Message = {}
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            if any(k.lower() == b"content-type" and v.startswith(b"text/html") for k, v in headers):
                body = _EXTERNAL_TAGS.sub(b"", body)
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)


def index_unnamed_endpoints(blocks: gr.Blocks) -> None:
    """Make gradio 4.40's page find each event's API description: its client looks events up by number in
    ``unnamed_endpoints``, which the server leaves empty, and then warns "Too many arguments provided for the
    endpoint" at every click (gradio issue #9895). Only the number of parameters is read there."""
    original = blocks.get_api_info

    def get_api_info(all_endpoints: bool = False) -> dict[str, Any] | None:
        info = original(all_endpoints)
        if info is None:
            return info
        for fn_index, fn in blocks.fns.items():
            named = info["named_endpoints"].get(f"/{fn.api_name}")
            if named is not None:
                parameters = [{"parameter_name": f"param_{i}", "parameter_has_default": True,
                               "parameter_default": None} for i in range(len(fn.inputs))]
                info["unnamed_endpoints"][str(fn_index)] = {**named, "parameters": parameters}
        return info

    blocks.get_api_info = get_api_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", metavar="DIR", default=os.path.join(os.getcwd(), "models"),
                        help="WebUI models folder (with Stable-diffusion/, text_encoder/, VAE/; created on download). "
                             "Default: ./models")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7870, help="port (default 7870; 0 picks a free one)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help="ask for this login (as the WebUI's --gradio-auth); use it when --host lets others in")


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``USER:PASSWORD`` -> (user, password); None when not given."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise FluxqError("--auth: give USER:PASSWORD (both non-empty), e.g. --auth anna:a-long-passphrase")
    return user, password


def page_assets() -> tuple[str, str]:
    """(css, head): the extension's style.css and javascript/fluxq.js, which the WebUI loads by itself."""
    with open(os.path.join(ROOT, "style.css"), encoding="utf-8") as handle:
        css = handle.read()
    with open(os.path.join(ROOT, "javascript", "fluxq.js"), encoding="utf-8") as handle:
        head = f"<script>{handle.read()}</script>"
    return css, head


def build_app(models_dir: str) -> gr.Blocks:
    """The standalone gradio app for ``models_dir``."""
    import gradio as gr

    from lib_fluxq.ui.host import StandaloneHost
    from lib_fluxq.ui.tab import build_tab

    css, head = page_assets()
    # system fonts: the default theme fetches Google Fonts, which an offline machine reports as console errors
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "Consolas", "monospace"])
    with gr.Blocks(title="Flux Quant", css=css, head=head, theme=theme, analytics_enabled=False) as app:
        build_tab(StandaloneHost(models_dir))
    index_unnamed_endpoints(app)
    return app


def run(args: argparse.Namespace) -> int:
    models = os.path.abspath(args.models)
    _check_models_folder(models)
    if not 0 <= args.port <= 65535:
        raise FluxqError(f"--port {args.port}: give a port between 1 and 65535 (0: any free port)")
    auth = parse_auth(getattr(args, "auth", None))
    _import_gradio()
    app = build_app(models)
    app.queue(max_size=QUEUE_SIZE)
    print(f"Flux Quant for {models}")
    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Note: {args.host} lets other machines reach this page with no login; add --auth USER:PASSWORD "
              "(docs/tab.md, Exposing the WebUI)")
    from starlette.middleware import Middleware
    app.launch(server_name=args.host, server_port=args.port or None, inbrowser=False, show_api=False,
               quiet=False, auth=auth, app_kwargs={"middleware": [Middleware(OfflinePage)]})
    return 0


def _check_models_folder(models: str) -> None:
    """A folder, or nothing yet (created on the first download); anything else is named with what it is."""
    try:
        mode = os.stat(models).st_mode
    except OSError as exc:
        if exc.errno == errno.ENOENT and not os.path.islink(models):
            return  # created on the first download
        from lib_fluxq.formats.detect import path_error

        raise FluxqError(f"--models {path_error(models, exc)}") from None
    if not stat.S_ISDIR(mode):
        raise FluxqError(f"--models {models}: is not a folder (give the WebUI's models folder)")
    try:   # a folder the app cannot list would start a page that shows no files and cannot save any
        os.listdir(models)
    except OSError as exc:
        from lib_fluxq.formats.detect import path_error

        raise FluxqError(f"--models {path_error(models, exc)}") from None


def _import_gradio() -> None:
    """Import gradio, or say what is wrong: not installed, or installed but failing on import (e.g. a
    huggingface_hub without ``HfFolder``, which gradio 4.40 imports), with the real error."""
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "gradio":
            raise FluxqError("the ui command needs gradio: pip install -r requirements-ui.txt (gradio 4.40.0, "
                             "Forge's version)") from None
        raise FluxqError(f"gradio is installed but cannot be imported: {exc}; install the versions it was tested "
                         "with: pip install -r requirements-ui.txt") from None
    except ImportError as exc:
        raise FluxqError(f"gradio is installed but cannot be imported: {exc}; install the versions it was tested "
                         "with: pip install -r requirements-ui.txt") from None
