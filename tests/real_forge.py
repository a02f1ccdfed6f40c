"""Shared helpers of the opt-in real-Forge tests (FORGE_DIR set; see FORGE_NOTES §9): start Forge CPU-only with the
API on 127.0.0.1 and a private --data-dir whose extensions/fluxq links to this repository, call the API, watch RSS,
and find tracebacks through our code in its console log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

FORGE_DIR = os.environ.get("FORGE_DIR")
requires_forge = pytest.mark.skipif(not FORGE_DIR, reason="set FORGE_DIR to a prepared Forge checkout to run")
REPO = Path(__file__).resolve().parents[1]
URL = "http://127.0.0.1:7860"  # no --port: an upstream bug breaks /sdapi/v1/cmd-flags with it (FORGE_NOTES §9)
GB = 1024**3


def forge_python() -> str:
    return str(Path(FORGE_DIR or ".") / "venv" / "bin" / "python")


def api(path: str, payload: dict | None = None, timeout: float = 30) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:  # the body names the exception; urllib's message only the status
        raise AssertionError(f"{path}: HTTP {error.code}: {error.read()[:2000]!r}") from error


def our_tracebacks(log_text: str) -> list[str]:
    """Tracebacks through our code (Forge's own "Failed reading extension data from Git repository" for a checkout
    without an 'origin' remote is not ours)."""
    tracebacks = re.findall(r"Traceback \(most recent call last\):\n(?:[ \t].*\n)+", log_text)
    return [t for t in tracebacks if "lib_fluxq" in t or "fluxq_hooks" in t or "fluxq_refine" in t]


@contextmanager
def running_forge(data_dir: Path, start_timeout: int = 240) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Forge started on ``data_dir`` (extensions/fluxq → this repository), up once it printed "Startup time:" and
    /sdapi/v1/options answers; yields (process, console log path) and stops it afterwards.

    Why not just the API answering: webui.py mounts the routes (and the server already runs) BEFORE ``Api.__init__``
    has filled ``default_script_arg_txt2img``; a txt2img with ``alwayson_scripts`` in that window fails with
    "IndexError: list assignment index out of range" in ``init_script_args`` (seen here, Forge dfdcbab6)."""
    (data_dir / "extensions").mkdir(parents=True, exist_ok=True)
    link = data_dir / "extensions" / "fluxq"
    if not link.exists():
        link.symlink_to(REPO)
    log_path = data_dir / "forge.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    args = [forge_python(), "launch.py", "--always-cpu", "--api", "--skip-prepare-environment", "--skip-install",
            "--skip-torch-cuda-test", "--skip-python-version-check", "--skip-version-check", "--do-not-download-clip",
            "--data-dir", str(data_dir)]
    with open(log_path, "w") as log:
        forge = subprocess.Popen(args, cwd=FORGE_DIR, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(start_timeout):
            if "Startup time:" in log_path.read_text():
                try:
                    api("/sdapi/v1/options", timeout=5)
                    break
                except OSError:
                    pass
            assert forge.poll() is None, log_path.read_text()[-3000:]
            time.sleep(1)
        else:
            raise AssertionError(f"Forge did not start in {start_timeout} s: {log_path.read_text()[-3000:]}")
        yield forge, log_path
    finally:
        forge.terminate()
        try:
            forge.wait(timeout=30)
        except subprocess.TimeoutExpired:
            forge.kill()


@contextmanager
def peak_rss(pid: int, on_peak: Callable[[], None] | None = None, interval: float = 0.2) -> Iterator[dict[str, int]]:
    """Samples the RSS of ``pid`` in a thread; the yielded dict holds 'baseline' and 'peak' (bytes). ``on_peak`` is
    called whenever a new peak is seen (to take more measurements at that moment)."""
    import psutil

    process = psutil.Process(pid)
    baseline = process.memory_info().rss
    result = {"baseline": baseline, "peak": baseline}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                rss = process.memory_info().rss
                if rss > result["peak"]:
                    result["peak"] = rss
                    if on_peak is not None:
                        on_peak()
            except (psutil.Error, OSError):
                return
            time.sleep(interval)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield result
    finally:
        stop.set()
        watcher.join()
