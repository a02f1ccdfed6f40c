"""The standalone tab (``python -m lib_fluxq ui``) as its own process, for the browser and API tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(hub_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of the app: HF_ENDPOINT at a stand-in Hub, nothing that phones home, nothing inherited that
    changes what a test sees (a token, offline mode, job limits)."""
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1",
               NO_PROXY="127.0.0.1,localhost")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "FLUXQ_JOB_LIMITS"):
        env.pop(name, None)
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    env.update(extra)
    return env


@contextlib.contextmanager
def running_app(models: Path, env: dict[str, str], log_path: Path,
                extra: tuple[str, ...] = ()) -> Iterator[tuple[str, subprocess.Popen]]:
    """Start the app on a free port (``extra``: more ``ui`` arguments); yield (url, process); stop it."""
    port = free_port()
    with open(log_path, "w") as log:
        app = subprocess.Popen([sys.executable, "-m", "lib_fluxq", "ui", "--models", str(models), "--port", str(port),
                                *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(url, timeout=5).read()
                    break
                except OSError:
                    if app.poll() is not None or time.monotonic() > deadline:
                        log.flush()
                        pytest.fail("the app did not start:\n" + log_path.read_text()[-3000:])
                    time.sleep(0.5)
            yield url, app
        finally:
            app.terminate()
            try:
                app.wait(15)
            except subprocess.TimeoutExpired:
                app.kill()
