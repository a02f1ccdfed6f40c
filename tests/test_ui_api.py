"""The tab's events called by their API names, as anyone who can reach a WebUI can (``--listen`` / ``--share``):
gradio_client against the standalone app in its own process, with crafted inputs, several visitors, and a flood of
parallel jobs.

What must hold (issue 19): every path from the page is refused unless it is a file the server listed inside the model
folders, with one line that repeats no byte of any file, before the file is opened; nothing is written outside the
folders; a visitor sees only titles and progress of other visitors' jobs and cannot stop them; an empty token field
never borrows the server's own Hugging Face login; per kind, no more jobs run than the limit, the rest wait or are
refused as busy, the server's memory stays near that of one job of each kind, and the server keeps answering.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path

import gradio_client as client_module  # pinned (requirements-ui.txt): missing is an error, never a skip
import psutil
import pytest

from lib_fluxq import catalog, jobs
from tests.test_download import FakeHub
from tests.ui_app import app_env, running_app

SECRET = b"root:x:0:0:root:/root:/bin/bash\nfluxq-secret-line\n"
SOURCE = "models/Stable-diffusion/tiny-flux-dev-bf16.safetensors"
ERROR = re.compile(r'<div class="fluxq-note fluxq-error">(.*?)</div>', re.S)


def _tiny_flux(path: Path, seed: int = 0, depth: int = 2) -> Path:
    import torch

    from lib_fluxq.flux import FluxConfig
    from tests.fixtures import random_flux_state_dict, write_safetensors
    config = FluxConfig(hidden=256, heads=2, depth=depth, depth_single=depth, context_in=512, vec_in=256)
    return write_safetensors(path, random_flux_state_dict(config, seed=seed, dtype=torch.bfloat16))


def _build(root: Path) -> dict[str, Path]:
    """models/ with a convertible file, a GGUF, a link leading out, a non-model file and a broken one; elsewhere/
    with a Flux file and a secret the tab must never read."""
    import gguf

    from tests.fixtures import SMALL_FLUX, random_flux_state_dict, recipe_qtype, write_gguf
    models, elsewhere = root / "models", root / "elsewhere"
    folder = models / "Stable-diffusion"
    for sub in (folder, models / "text_encoder", models / "VAE", elsewhere):
        sub.mkdir(parents=True)
    _tiny_flux(folder / "tiny-flux-dev-bf16.safetensors")
    write_gguf(folder / "flux1-dev-Q4_0.gguf", random_flux_state_dict(SMALL_FLUX),
               recipe_qtype(gguf.GGMLQuantizationType.Q4_0))
    outside = _tiny_flux(elsewhere / "outside-flux-dev-bf16.safetensors", seed=1)
    secret = elsewhere / "passwd"
    secret.write_bytes(SECRET)
    (folder / "escape.safetensors").symlink_to(outside)
    (folder / "secret.safetensors").symlink_to(secret)
    (folder / "notes.txt").write_bytes(SECRET)
    (folder / "broken.safetensors").write_bytes(SECRET)
    return {"models": models, "elsewhere": elsewhere, "outside": outside, "secret": secret, "folder": folder}


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file below ``root`` (links not followed) with its size and sha256, except the server's own console log
    that the test harness keeps there (it grows while the server answers)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path == root / "app.log":
            continue
        if path.is_file() and not path.is_symlink():
            found[str(path.relative_to(root))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        elif path.is_symlink():
            found[str(path.relative_to(root))] = (-1, os.readlink(path))
    return found


def _forbidden(files: dict[str, Path]) -> list[str]:
    """What no answer may contain: the secret's bytes, the number its first 8 bytes make as a header length, and
    the server's folders."""
    return [SECRET[:8].decode(), "fluxq-secret-line", str(int.from_bytes(SECRET[:8], "little")),
            str(files["elsewhere"]), str(files["models"])]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared-webui")
    files = _build(root)
    hub_data = {}
    with FakeHub(chunk=16 * 1024, delay=0.02) as hub:   # ~2 s per file: long enough to stop one
        for entry in catalog.CATALOG:
            hub_data[entry.key] = hashlib.shake_256(entry.key.encode()).digest(1_500_000)
            hub.add(entry.repo, entry.filename, hub_data[entry.key])
        hub.gated.add("black-forest-labs/FLUX.1-schnell")   # the VAE's repository: needs a token here
        env = app_env(hub.url, HF_TOKEN=hub.token)           # the server's own login, which visitors must not use
        with running_app(files["models"], env, root / "app.log") as (url, process):
            yield {"url": url, "process": process, "hub": hub, "data": hub_data, "log": root / "app.log", **files}


def _visitor(url: str):
    """A new browser session. gradio_client's 5 s read timeout is raised: on a shared 2-core test machine the
    server (busy with the jobs it allows) can take longer to answer; that it answers at all is what is checked."""
    return client_module.Client(url, verbose=False, httpx_kwargs={"timeout": 120})


def _start(visitor, *args, api_name: str) -> str:
    """A job event's answer as one page: the section's message line (why nothing started) and its job list."""
    message, jobs_list = visitor.predict(*args, api_name=api_name)
    return message + jobs_list


def _errors(page: str) -> list[str]:
    return ERROR.findall(page)


def _one_line_refusal(page: str, forbidden: list[str]) -> str:
    errors = _errors(page)
    assert len(errors) == 1, page
    message = errors[0]
    assert "\n" not in message and "<br" not in message and len(message) < 300, message
    for text in forbidden:
        assert text not in page, (text, page)
    return message


CRAFTED = ["{outside}", "{secret}", "/etc/passwd", "models/Stable-diffusion/../../elsewhere/passwd",
           "models/Stable-diffusion/../../elsewhere/outside-flux-dev-bf16.safetensors",
           "{folder}/../../elsewhere/outside-flux-dev-bf16.safetensors", "../../../../etc/passwd",
           "models/Stable-diffusion/escape.safetensors", "models/Stable-diffusion/secret.safetensors",
           "models/Stable-diffusion/notes.txt", "models/Stable-diffusion/broken.safetensors",
           "models/Stable-diffusion/never-listed.safetensors", "{folder}/tiny-flux-dev-bf16.safetensors",
           "models\\Stable-diffusion\\tiny-flux-dev-bf16.safetensors", "x" * 3000]


def _crafted(site) -> list[str]:
    return [c.format(outside=site["outside"], secret=site["secret"], folder=site["folder"]) for c in CRAFTED]


def test_every_event_refuses_paths_it_did_not_list(site):
    before = _tree(site["models"].parent)
    forbidden = _forbidden(site)
    visitor = _visitor(site["url"])
    plan = ("", 8, 32, "1024x1024", "dev")
    for value in _crafted(site):
        page, size, gpu = visitor.predict(value, *plan, api_name="/use_this")
        assert (size, gpu) == ("", ""), (value, page)
        _one_line_refusal(page, forbidden)
        for api, args in (("/convert", (value, "Q8_0", "default", "", False)),
                          ("/convert", (value, "Q8_0", "default", "", True)),
                          ("/compare", (value, "Q8_0"))):
            message = _one_line_refusal(_start(visitor, *args, api_name=api), forbidden)
            assert "not a file the tab listed" in message or "is not" in message or "link" in message, message
        suggestion = visitor.predict(value, "Q8_0", api_name="/suggest_name")
        assert not any(text in str(suggestion) for text in forbidden + ["outside-flux"]), suggestion
    # a listed GGUF is a checkpoint for "Use this" but not a full-precision source: the answer says what it is not
    gguf_label = "models/Stable-diffusion/flux1-dev-Q4_0.gguf"
    message = _one_line_refusal(_start(visitor, gguf_label, "Q8_0", "default", "", False, api_name="/convert"),
                                forbidden)
    assert message == f"{gguf_label} is not a full-precision or FP8 Flux transformer (F32 / F16 / BF16 / FP8)"
    page, _, _ = visitor.predict(gguf_label, *plan, api_name="/use_this")
    assert not _errors(page) and "Checkpoint: flux1-dev-Q4_0.gguf" in page, page

    # a listed source, but an output name that would leave its folder, hide, or replace something outside
    for name in ("../../elsewhere/evil.gguf", f"{site['elsewhere']}/evil.gguf", "/tmp/evil.gguf", "sub/evil.gguf",
                 "..", ".evil.gguf", "evil\\..\\x.gguf", "C:evil.gguf", "x" * 300, "../../elsewhere/passwd"):
        for replace in (False, True):
            message = _one_line_refusal(_start(visitor, SOURCE, "Q8_0", "default", name, replace,
                                                        api_name="/convert"), forbidden)
            assert "plain file name" in message, message
    for key in ("../../../etc/passwd", "/etc/passwd", "clip_l/../../x", "comfyanonymous/flux_text_encoders",
                "clip_l.safetensors", "", "x" * 3000):
        message = _one_line_refusal(_start(visitor, key, "", api_name="/download"), forbidden)
        assert "is not in the catalog" in message, message
    for size, model in (("../../etc/passwd", "dev"), ("1024x1024", "/etc/passwd"), ("99999999x1", "dev")):
        outputs = visitor.predict("", 8, 32, size, model, api_name="/plan")
        _one_line_refusal(outputs[0], forbidden)
        assert not any(text in str(outputs) for text in forbidden)
    outputs = visitor.predict("x" * 5000, 8, 32, "1024x1024", "dev", api_name="/plan")   # a card name: cut short
    assert not _errors(outputs[0]) and "x" * 81 not in outputs[0], outputs[0]
    assert [t for t in forbidden if t in str(outputs)] == [], outputs
    assert _tree(site["models"].parent) == before   # nothing written, inside or outside the folders
    assert "Traceback" not in site["log"].read_text()


def _wait_mine(visitor, kind: str) -> str:
    """The visitor's own jobs of ``kind`` once none is running or waiting (the watcher returns then)."""
    return visitor.predict(api_name=f"/watch_{kind}")


def test_visitors_see_only_titles_of_other_visitors_jobs_and_cannot_stop_them(site):
    alice, bob = _visitor(site["url"]), _visitor(site["url"])
    target = site["folder"] / "alice-Q8_0.gguf"
    page = _start(alice, SOURCE, "Q8_0", "default", "alice-Q8_0", False, api_name="/convert")
    assert not _errors(page), page
    page = _wait_mine(alice, "convert")
    assert "wrote models/Stable-diffusion/alice-Q8_0.gguf: Q8_0" in page, page
    seen_by_bob = bob.predict(api_name="/watch_convert")
    assert "convert tiny-flux-dev-bf16.safetensors → Q8_0" in seen_by_bob
    assert "(started by another visitor)" in seen_by_bob
    assert "wrote" not in seen_by_bob and "alice-Q8_0" not in seen_by_bob

    # Bob's "Stop" and "show" reach only his own jobs
    page = _start(alice, "flux1-dev-q8_0", "", api_name="/download")
    assert not _errors(page) and 'data-state="running"' in page, page
    page = bob.predict(api_name="/stop_download")
    assert 'data-state="running" data-mine="0"' in page and "cancelling" not in page, page
    page = _wait_mine(alice, "download")
    assert re.search(r'data-state="done" data-mine="1"><b>#\d+ download flux1-dev-Q8_0.gguf', page), page
    assert (site["models"] / "Stable-diffusion" / "flux1-dev-Q8_0.gguf").read_bytes() == site["data"]["flux1-dev-q8_0"]
    page = _start(alice, SOURCE, "Q8_0", api_name="/compare")
    assert not _errors(page), page
    _wait_mine(alice, "compare")
    table, plot = alice.predict(api_name="/show_compare")
    assert "<td>Q8_0</td>" in table and plot and Path(plot).stat().st_size > 1000
    nothing, no_plot = bob.predict(api_name="/show_compare")
    assert "<td>Q8_0</td>" not in str(nothing) and not isinstance(no_plot, str)   # nothing of Alice's: no update

    # Alice can stop her own download; it resumes later
    page = _start(alice, "flux1-dev-q6_k", "", api_name="/download")
    alice.predict(api_name="/stop_download")
    page = _wait_mine(alice, "download")
    assert re.search(r'data-state="cancelled" data-mine="1"><b>#\d+ download flux1-dev-Q6_K.gguf', page), page
    target.unlink()
    (site["models"] / "Stable-diffusion" / "flux1-dev-Q8_0.gguf").unlink()


def test_an_empty_token_field_never_uses_the_servers_own_login(site):
    """The server runs with HF_TOKEN set (its owner's login); the VAE's repository is gated on this Hub."""
    visitor = _visitor(site["url"])
    target = site["models"] / "VAE" / "ae.safetensors"
    _start(visitor, "ae", "", api_name="/download")
    page = _wait_mine(visitor, "download")
    assert "black-forest-labs/FLUX.1-schnell is gated" in page and not target.exists(), page
    _start(visitor, "ae", "   ", api_name="/download")
    assert "is gated" in _wait_mine(visitor, "download")
    _start(visitor, "ae", site["hub"].token, api_name="/download")   # pasted by the visitor: used
    page = _wait_mine(visitor, "download")
    assert re.search(r'data-state="done" data-mine="1"><b>#\d+ download ae.safetensors', page), page
    assert target.read_bytes() == site["data"]["ae"]
    assert site["hub"].token not in page
    target.unlink()


def test_the_standalone_app_asks_for_its_login(tmp_path):
    """``ui --auth USER:PASSWORD`` (the WebUI's --gradio-auth): no event answers without the login."""
    from lib_fluxq.ui.app import parse_auth
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    with running_app(models, app_env(), tmp_path / "app.log", ("--auth", "anna:a-long-passphrase")) as (url, _):
        with pytest.raises(client_module.exceptions.AuthenticationError, match="credentials were not provided"):
            client_module.Client(url, verbose=False).predict("", 8, 32, "1024x1024", "flux-dev", api_name="/plan")
        logged_in = client_module.Client(url, verbose=False, auth=("anna", "a-long-passphrase"))
        assert "fluxq_summary" in logged_in.predict("", 8, 32, "1024x1024", "flux-dev", api_name="/plan")[0]
    for bad in ("anna", "anna:", ":pw"):
        with pytest.raises(jobs.FluxqError, match="--auth: give USER:PASSWORD"):
            parse_auth(bad)


# ------------------------------------------------------------------------------------------------------ the flood

def _states(page: str) -> list[str]:
    return re.findall(r'data-state="(\w+)"', page)


def _peak_rss(pid: int, reset: bool = False) -> int | None:
    """The kernel's high-water mark of the process's resident memory (VmHWM), exact whatever the sampling; with
    ``reset`` it starts over (``clear_refs`` 5). None where /proc does not offer it."""
    try:
        if reset:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.M)
    return int(match.group(1)) * 1024 if match else None


class _Monitor(threading.Thread):
    """Samples, every ~0.2 s from its own visitor: the most jobs of each kind shown running and waiting, the
    server's RSS, and whether the server still answers a plan request (the slowest round-trip is kept)."""

    def __init__(self, url: str, pid: int) -> None:
        super().__init__(daemon=True)
        self.visitor = _visitor(url)
        self.process = psutil.Process(pid)
        self.stop = threading.Event()
        self.most: dict[tuple[str, str], int] = {}
        self.peak_rss = 0
        self.answers = 0
        self.slowest = 0.0

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in [self.process, *self.process.children(recursive=True)])

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_rss = max(self.peak_rss, self.rss())
            for kind in jobs.DEFAULT_LIMITS:
                shown = _states(self.visitor.predict(api_name=f"/watch_{kind}"))
                for state in (jobs.RUNNING, jobs.WAITING):
                    self.most[kind, state] = max(self.most.get((kind, state), 0), shown.count(state))
            if self.answers % 5 == 0:
                started = time.monotonic()
                self.visitor.predict("", 8, 32, "1024x1024", "dev", api_name="/plan")
                self.slowest = max(self.slowest, time.monotonic() - started)
            self.answers += 1
            self.stop.wait(0.2)


def _fire(visitors: list, requests: list[tuple[str, tuple]]) -> list[str]:
    """Each request from its own visitor, all at once."""
    answers: list[str] = [""] * len(requests)
    barrier = threading.Barrier(len(requests))

    def send(i: int) -> None:
        api, args = requests[i]
        barrier.wait()
        answers[i] = _start(visitors[i], *args, api_name=api)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers


def _wait_idle(url: str, timeout: float = 600) -> None:
    visitor = _visitor(url)
    deadline = time.monotonic() + timeout
    while any(s in ("running", "waiting") for kind in jobs.DEFAULT_LIMITS
              for s in _states(visitor.predict(api_name=f"/watch_{kind}"))):
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.3)


def test_a_flood_of_parallel_jobs_stays_within_the_limits(tmp_path):
    """12 comparisons, 12 conversions and 12 downloads requested at once by 36 visitors."""
    models = tmp_path / "models"
    folder = models / "Stable-diffusion"
    for sub in (folder, models / "text_encoder", models / "VAE"):
        sub.mkdir(parents=True)
    _tiny_flux(folder / "tiny-flux-dev-bf16.safetensors")
    keys = [e.key for e in catalog.CATALOG][:12]
    with FakeHub(chunk=16 * 1024, delay=0.05) as hub:   # ~6 s per download: they outlast the flood
        data = {}
        for entry in catalog.CATALOG:
            data[entry.key] = hashlib.shake_256(entry.key.encode()).digest(2_000_000)
            hub.add(entry.repo, entry.filename, data[entry.key])
        # smaller lines than the defaults keep the test short; FLUXQ_JOB_LIMITS is how a server admin sets them
        env = app_env(hub.url, FLUXQ_JOB_LIMITS="compare=1:1,convert=1:1,download=2:2")
        with running_app(models, env, tmp_path / "app.log") as (url, process):
            compare = ("/compare", (SOURCE, "Q8_0"))
            convert = [("/convert", (SOURCE, "Q8_0", "default", f"out-{i}", False)) for i in range(12)]
            download = [("/download", (key, "")) for key in keys]
            visitors = [_visitor(url) for _ in range(36)]   # 36 sessions, joined before the jobs
            monitor = _Monitor(url, process.pid)
            monitor.start()
            started = time.monotonic()
            idle = _peak_rss(process.pid, reset=True) or monitor.rss()
            # one job of each kind at a time, as the limits allow at most: the memory the server needs
            _fire(visitors[:3], [compare, convert[0], download[0]])
            _wait_idle(url)
            single_peak, single_s = _peak_rss(process.pid) or monitor.peak_rss, time.monotonic() - started
            _peak_rss(process.pid, reset=True)
            monitor.peak_rss = 0
            answers = _fire(visitors[:34], [compare] * 12 + convert[1:] + download[1:])
            _wait_idle(url)
            flood_peak = _peak_rss(process.pid) or monitor.peak_rss
            monitor.stop.set()
            monitor.join(60)
    print(f"\npeak RSS: before any job {idle / 1e6:.0f} MB, one job of each kind {single_peak / 1e6:.0f} MB "
          f"({single_s:.0f} s), flood {flood_peak / 1e6:.0f} MB ({time.monotonic() - started - single_s:.0f} s); "
          f"most shown {monitor.most}; slowest plan answer {monitor.slowest:.1f} s over {monitor.answers} polls")
    limits = jobs.limits_from_env({jobs.LIMITS_ENV: env[jobs.LIMITS_ENV]})
    pages = {"compare": answers[:12], "convert": answers[12:23], "download": answers[23:]}
    accepted = {}
    for kind, answered in pages.items():
        accepted[kind] = [p for p in answered if not _errors(p)]
        busy = [_errors(p)[0] for p in answered if _errors(p)]
        # the line was full: the rest were refused with one line (jobs that end during the flood free places)
        assert len(accepted[kind]) >= limits[kind].running + limits[kind].waiting, (kind, busy)
        assert busy and all(b.startswith(f"busy: {limits[kind].running} ") for b in busy), (kind, busy)
        assert monitor.most[kind, jobs.RUNNING] <= limits[kind].running, (kind, monitor.most)
        assert monitor.most[kind, jobs.WAITING] <= limits[kind].waiting, (kind, monitor.most)
    assert monitor.most["compare", jobs.RUNNING] == 1 and monitor.most["download", jobs.RUNNING] == 2, monitor.most
    assert monitor.most["download", jobs.WAITING] == limits["download"].waiting, monitor.most
    # every accepted job ran to its end: the waiting ones too
    written = sorted(p.name for p in folder.glob("out-*.gguf"))
    assert len(written) == 1 + len(accepted["convert"]), written
    landed = [e for e in catalog.CATALOG if (models / e.folder / e.filename).exists()]
    assert len(landed) == 1 + len(accepted["download"])
    assert all((models / e.folder / e.filename).read_bytes() == data[e.key] for e in landed)
    # memory near that of one job of each kind (12 comparisons at once would hold 12 of them), and the server kept
    # answering throughout
    assert flood_peak - idle <= 1.5 * (single_peak - idle) + 150e6
    assert monitor.answers > 10 and "Traceback" not in (tmp_path / "app.log").read_text()
