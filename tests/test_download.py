"""lib_fluxq.download / catalog / jobs against a local stand-in for the Hugging Face Hub.

``FakeHub`` implements the two requests huggingface_hub's ``hf_hub_download`` makes (HEAD and ranged GET on
``/{repo}/resolve/{revision}/{file}``, with the Hub's X-Repo-Commit / X-Linked-Etag / X-Linked-Size headers, a
redirect to a CDN path for LFS files and the Hub's error codes). That it is faithful is checked with
``hf_hub_download`` itself, the reference client; then our downloader must produce the same bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from lib_fluxq import catalog, download, jobs

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """A tiny Hub on 127.0.0.1: ``files[(repo, filename)] = bytes``; ``gated`` repos need ``token``."""

    def __init__(self, chunk: int = 64 * 1024, delay: float = 0.0) -> None:
        self.files: dict[tuple[str, str], bytes] = {}
        self.gated: set[str] = set()
        self.token = "hf_test_token"
        self.chunk, self.delay = chunk, delay
        self.drop_after: int | None = None     # close the next GET after this many bytes (simulated network cut)
        self.requests: list[tuple[str, str, str | None]] = []   # (method, path, Range header)
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo: str, filename: str, data: bytes) -> str:
        self.files[(repo, filename)] = data
        return hashlib.sha256(data).hexdigest()

    def _error(self, h, status: int, code: str) -> None:
        h.send_response(status)
        h.send_header("X-Error-Code", code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _serve(self, h, head: bool) -> None:
        self.requests.append((h.command, h.path, h.headers.get("Range")))
        cdn = re.fullmatch(r"/cdn/([0-9a-f]{64})", h.path)
        if cdn:
            data = next((d for d in self.files.values() if hashlib.sha256(d).hexdigest() == cdn.group(1)), None)
            if data is None:
                return self._error(h, 404, "EntryNotFound")
            return self._send_bytes(h, data, head)
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", h.path)
        if not match:
            return self._error(h, 404, "RepoNotFound")
        repo, _, filename = match.groups()
        if not any(r == repo for r, _ in self.files):
            return self._error(h, 401, "RepoNotFound")   # the Hub answers 401 for unknown repos
        if repo in self.gated and h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._error(h, 401, "GatedRepo")
        data = self.files.get((repo, filename))
        if data is None:
            return self._error(h, 404, "EntryNotFound")
        sha = hashlib.sha256(data).hexdigest()
        # LFS file: redirect to the CDN, announcing the linked file's etag and size (as huggingface.co does)
        h.send_response(302)
        h.send_header("Location", f"{self.url}/cdn/{sha}")
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("X-Linked-Etag", f'"{sha}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("ETag", '"pointer"')
        h.send_header("Content-Length", "0")
        h.end_headers()

    def _send_bytes(self, h, data: bytes, head: bool) -> None:
        start = 0
        ranged = h.headers.get("Range")
        if ranged:
            start = int(re.fullmatch(r"bytes=(\d+)-", ranged).group(1))
        body = data[start:]
        h.send_response(206 if ranged else 200)
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(body)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.end_headers()
        if head:
            return
        limit, self.drop_after = self.drop_after, None
        sent = 0
        for i in range(0, len(body), self.chunk):
            piece = body[i:i + self.chunk]
            if limit is not None and sent + len(piece) > limit:
                h.wfile.write(piece[:limit - sent])
                h.wfile.flush()
                h.close_connection = True
                h.connection.shutdown(2)   # cut mid-body, like a dropped connection
                return
            h.wfile.write(piece)
            sent += len(piece)
            if self.delay:
                time.sleep(self.delay)


@pytest.fixture()
def hub(monkeypatch):
    with FakeHub() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
        yield server


def payload(n: int, seed: int = 0) -> bytes:
    return hashlib.shake_256(f"fluxq-{seed}".encode()).digest(n)


def test_fake_hub_is_what_hf_hub_download_expects(hub, tmp_path):
    """The reference client downloads from the stand-in; our downloader gets the identical bytes."""
    from huggingface_hub import hf_hub_download
    data = payload(300_000)
    hub.add("org/flux", "ae.safetensors", data)
    reference = hf_hub_download("org/flux", "ae.safetensors", local_dir=tmp_path / "ref", endpoint=hub.url)
    assert Path(reference).read_bytes() == data
    seen = []
    result = download.download("org/flux", "ae.safetensors", tmp_path / "VAE",
                               progress=lambda done, total, text: seen.append((done, total)))
    assert Path(result.path) == tmp_path / "VAE" / "ae.safetensors"
    assert Path(result.path).read_bytes() == Path(reference).read_bytes()
    assert result.verified_sha256 and result.resumed_from == 0
    assert seen[-1] == (len(data), len(data))
    assert [p.name for p in (tmp_path / "VAE").iterdir()] == ["ae.safetensors"]   # no partial/lock left behind


def test_a_cut_connection_resumes_with_a_range_request(hub, tmp_path):
    piece = download.CHUNK   # whole read chunks before the cut are kept
    data = payload(3 * piece + 12345, seed=1)
    hub.add("org/flux", "clip_l.safetensors", data)
    hub.drop_after = piece + piece // 2
    result = download.download("org/flux", "clip_l.safetensors", tmp_path)
    assert (tmp_path / "clip_l.safetensors").read_bytes() == data and result.verified_sha256
    gets = [r for r in hub.requests if r[0] == "GET"]
    assert [r[2] for r in gets] == [None, f"bytes={piece}-"]


def test_cancel_keeps_partial_then_resumes(tmp_path, monkeypatch):
    with FakeHub(chunk=64 * 1024, delay=0.002) as slow:
        monkeypatch.setenv("HF_ENDPOINT", slow.url)
        data = payload(3 * download.CHUNK + 999, seed=2)
        slow.add("org/flux", "t5.safetensors", data)
        cancel = threading.Event()

        def stop_midway(done: int, total: int, text: str) -> None:
            if done > 100_000:
                cancel.set()

        with pytest.raises(download.DownloadCancelled, match="resume"):
            download.download("org/flux", "t5.safetensors", tmp_path, progress=stop_midway, cancel=cancel)
        assert not (tmp_path / "t5.safetensors").exists()
        (partial,) = tmp_path.glob(".t5.safetensors.*.partial")
        assert partial.stat().st_size == download.CHUNK    # stopped within one read chunk
        result = download.download("org/flux", "t5.safetensors", tmp_path)
        assert result.resumed_from > 100_000
        assert hashlib.sha256((tmp_path / "t5.safetensors").read_bytes()).hexdigest() == \
            hashlib.sha256(data).hexdigest()


def test_corrupt_partial_is_detected_and_removed(hub, tmp_path):
    data = payload(200_000, seed=3)
    sha = hub.add("org/flux", "ae.safetensors", data)
    remote = download.resolve("org/flux", "ae.safetensors")
    assert remote.etag == sha and remote.size == len(data) and remote.commit == COMMIT
    bad = bytearray(data[:50_000])
    bad[10] ^= 0xFF
    Path(download.partial_path(str(tmp_path / "ae.safetensors"), remote)).write_bytes(bytes(bad))
    with pytest.raises(download.DownloadError, match="sha256"):
        download.download("org/flux", "ae.safetensors", tmp_path)
    assert not list(tmp_path.iterdir())
    download.download("org/flux", "ae.safetensors", tmp_path)
    assert (tmp_path / "ae.safetensors").read_bytes() == data


def test_existing_files_are_never_overwritten(hub, tmp_path):
    data = payload(1000, seed=4)
    hub.add("org/flux", "ae.safetensors", data)
    (tmp_path / "ae.safetensors").write_bytes(b"the user's own file")
    with pytest.raises(download.DownloadError, match="never overwritten"):
        download.download("org/flux", "ae.safetensors", tmp_path)
    assert (tmp_path / "ae.safetensors").read_bytes() == b"the user's own file"
    (tmp_path / "ae.safetensors").write_bytes(data)
    assert download.download("org/flux", "ae.safetensors", tmp_path).already_present


def test_gated_repo_needs_the_token(hub, tmp_path):
    hub.add("bfl/gated", "flux.gguf", payload(5000))
    hub.gated.add("bfl/gated")
    with pytest.raises(download.DownloadError, match="gated"):
        download.download("bfl/gated", "flux.gguf", tmp_path)
    result = download.download("bfl/gated", "flux.gguf", tmp_path, token=hub.token)
    assert Path(result.path).stat().st_size == 5000


def test_clear_errors_for_missing_file_repo_and_offline(hub, tmp_path, monkeypatch):
    hub.add("org/flux", "ae.safetensors", b"x")
    with pytest.raises(download.DownloadError, match="is not in org/flux"):
        download.download("org/flux", "nope.gguf", tmp_path)
    with pytest.raises(download.DownloadError, match="not found or needs a token"):
        download.download("org/other", "ae.safetensors", tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(download.DownloadError, match="offline"):
        download.download("org/flux", "ae.safetensors", tmp_path)
    assert not hub.requests[-1][1].endswith("ae.safetensors") or len(hub.requests) == 2


def test_disk_space_is_checked_before_any_byte(hub, tmp_path, monkeypatch):
    hub.add("org/flux", "big.gguf", payload(10_000))
    real = shutil.disk_usage(tmp_path)
    # pretend only 5 kB are free (the real free space cannot be made small here)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: real._replace(free=5_000))
    with pytest.raises(download.DownloadError, match="not enough space"):
        download.download("org/flux", "big.gguf", tmp_path)
    assert not any(method == "GET" for method, _, _ in hub.requests)
    assert not list(tmp_path.iterdir())


def test_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    with FakeHub() as gone:
        url = gone.url
    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "2")
    with pytest.raises(download.DownloadError, match="cannot reach"):
        download.resolve("org/flux", "ae.safetensors")


def test_catalog_covers_what_pairing_tells_users_to_download():
    from lib_fluxq import families
    needed = {p for fam in families.FAMILIES.values() for p in fam.companions}
    for part in needed:
        comp = families.companion(part)
        entries = catalog.for_part(part)
        assert {(e.repo, e.filename) for e in entries} == {(d.repo, d.path) for d in comp.downloads}, part
        assert {e.folder for e in entries} == {comp.folder}
    keys = [e.key for e in catalog.CATALOG]
    assert len(keys) == len(set(keys))
    for entry in catalog.CATALOG:
        assert entry.filename.endswith((".gguf", ".safetensors")) and "/" in entry.repo
        assert entry.size_gb > 0 and entry.licence


def test_catalog_levels_are_levels_the_advisor_knows():
    from lib_fluxq import advisor

    for entry in catalog.CATALOG:
        if entry.kind == "transformer":
            assert advisor.resolve_level(entry.level) is not None, entry.level


def test_jobs_refuse_a_second_writer_of_the_same_target(tmp_path):
    # two conversions may run at once here, so "other" runs beside "a" (the per-kind limits have their own tests)
    runner = jobs.JobRunner({"convert": jobs.Limit(2, 0), "download": jobs.Limit(2, 0)})
    gate = threading.Event()

    def slow(job: jobs.Job) -> str:
        job.report(1, 2, "half")
        gate.wait(5)
        return "written"

    first = runner.start("convert", "a", str(tmp_path / "out.gguf"), slow)
    with pytest.raises(jobs.JobConflict, match="already being written"):
        runner.start("download", "b", str(tmp_path / "sub" / ".." / "out.gguf"), slow)
    other = runner.start("convert", "c", str(tmp_path / "other.gguf"), lambda job: "ok")
    assert runner.wait(other.id, 5).state == jobs.DONE
    gate.set()
    assert runner.wait(first.id, 5).result == "written"
    assert first.history == ["starting", "half"] or first.history == ["half"]
    again = runner.start("convert", "a", str(tmp_path / "out.gguf"), lambda job: "ok")   # free again
    assert runner.wait(again.id, 5).state == jobs.DONE


def test_jobs_cancel_and_failure_are_reported(tmp_path):
    runner = jobs.JobRunner()

    def until_cancelled(job: jobs.Job) -> str:
        while not job.cancel.wait(0.01):
            pass
        raise download.DownloadCancelled("stopped")

    job = runner.start("download", "x", str(tmp_path / "x"), until_cancelled)
    assert runner.cancel(job.id)
    assert runner.wait(job.id, 5).state == jobs.CANCELLED
    failing = runner.start("convert", "y", str(tmp_path / "y"), lambda job: 1 / 0)
    assert runner.wait(failing.id, 5).state == jobs.FAILED
    assert "ZeroDivisionError" in failing.result


def test_no_token_means_none_even_with_a_saved_login(hub, tmp_path, monkeypatch):
    """``token=False`` (the tab's empty token field) sends no token although the server has one (HF_TOKEN here);
    ``token=None`` (the CLI's default) uses it, as huggingface_hub does."""
    hub.add("bfl/gated", "flux.gguf", payload(5000))
    hub.gated.add("bfl/gated")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_IMPLICIT_TOKEN", False)   # read once at import
    monkeypatch.setenv("HF_TOKEN", hub.token)
    with pytest.raises(download.DownloadError, match="gated"):
        download.download("bfl/gated", "flux.gguf", tmp_path / "visitor", token=False)
    assert not (tmp_path / "visitor" / "flux.gguf").exists()
    assert download.download("bfl/gated", "flux.gguf", tmp_path / "owner").size == 5000


def test_a_file_that_appears_during_a_download_is_never_overwritten(tmp_path, monkeypatch):
    with FakeHub(chunk=16 * 1024, delay=0.002) as slow:
        monkeypatch.setenv("HF_ENDPOINT", slow.url)
        data = payload(400_000, seed=5)
        slow.add("org/flux", "ae.safetensors", data)
        dest = tmp_path / "ae.safetensors"

        def someone_else_writes(done: int, total: int, text: str) -> None:
            if done > 100_000 and not dest.exists():
                dest.write_bytes(b"another writer's file")

        with pytest.raises(download.DownloadError, match="appeared while ae.safetensors was downloading"):
            download.download("org/flux", "ae.safetensors", tmp_path, progress=someone_else_writes)
        assert dest.read_bytes() == b"another writer's file"
        dest.unlink()   # once the user moved it away, the kept download completes without a single new byte
        gets = len([r for r in slow.requests if r[0] == "GET"])
        assert download.download("org/flux", "ae.safetensors", tmp_path).resumed_from == len(data)
        assert dest.read_bytes() == data and len([r for r in slow.requests if r[0] == "GET"]) == gets


def test_place_file_never_replaces_unless_asked(tmp_path):
    tmp, dst = tmp_path / ".new.partial", tmp_path / "model.gguf"
    tmp.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        jobs.place_file(str(tmp), str(dst))
    assert dst.read_bytes() == b"old" and tmp.read_bytes() == b"new"
    jobs.place_file(str(tmp), str(dst), replace=True)
    assert dst.read_bytes() == b"new" and not tmp.exists()
    tmp.write_bytes(b"fresh")
    jobs.place_file(str(tmp), str(tmp_path / "other.gguf"))
    assert (tmp_path / "other.gguf").read_bytes() == b"fresh" and not tmp.exists()


def _gate_job(runner: jobs.JobRunner, kind: str, name: str, gate: threading.Event, ran: list[str]) -> jobs.Job:
    def work(job: jobs.Job) -> str:
        ran.append(name)
        gate.wait(10)
        return name
    return runner.start(kind, name, name, work)


def test_jobs_run_within_the_limits_and_the_rest_wait_or_are_busy():
    runner = jobs.JobRunner(limits={"convert": jobs.Limit(1, 2), "download": jobs.Limit(2, 1)})
    gate, ran = threading.Event(), []
    first = _gate_job(runner, "convert", "c1", gate, ran)
    waiting = [_gate_job(runner, "convert", f"c{i}", gate, ran) for i in (2, 3)]
    with pytest.raises(jobs.JobBusy, match=r"^busy: 1 conversion running and 2 waiting, the most this server takes"):
        _gate_job(runner, "convert", "c4", gate, ran)
    downloads = [_gate_job(runner, "download", f"d{i}", gate, ran) for i in (1, 2, 3)]   # other kinds are apart
    time.sleep(0.2)
    assert first.state == jobs.RUNNING and [j.state for j in waiting] == [jobs.WAITING] * 2
    assert [j.state for j in downloads] == [jobs.RUNNING, jobs.RUNNING, jobs.WAITING]
    assert sorted(ran) == ["c1", "d1", "d2"] and runner.counts("convert") == (1, 2)
    assert runner.cancel(waiting[0].id)   # a waiting job ends at once, never runs, and frees its place in line
    assert waiting[0].state == jobs.CANCELLED and waiting[0].result == "cancelled before it started"
    fourth = _gate_job(runner, "convert", "c4", gate, ran)
    gate.set()
    for job in (first, waiting[1], fourth, *downloads):
        assert runner.wait(job.id, 10).state == jobs.DONE
    assert "c2" not in ran and ran.index("c3") < ran.index("c4")   # in order of arrival
    assert runner.counts("convert") == (0, 0)


def test_disk_reservations_count_the_jobs_in_flight(tmp_path, monkeypatch):
    runner = jobs.JobRunner(limits={"download": jobs.Limit(3, 0)})
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(jobs.shutil, "disk_usage", lambda path: real._replace(free=1000 * 10**6))
    gate = threading.Event()
    holding = runner.start("download", "a", "a", lambda job: gate.wait(10) and "a")
    runner.reserve(holding, str(tmp_path / "VAE"), 600 * 10**6, "a.safetensors")   # folder not made yet: its parent
    other = runner.start("download", "b", "b", lambda job: gate.wait(10) and "b")
    with pytest.raises(jobs.NotEnoughSpace, match=r"not enough space for b.gguf: it needs .*, 1.00 GB free, of which "
                                                  r"0.60 GB is promised to 1 job\(s\) in flight"):
        runner.reserve(other, str(tmp_path), 600 * 10**6, "b.gguf")
    holding.report(400, 1000, "written 40%", bytes_left=200 * 10**6)   # what it still has to write counts
    runner.reserve(other, str(tmp_path), 600 * 10**6, "b.gguf")
    gate.set()
    runner.wait(holding.id, 10)
    runner.wait(other.id, 10)
    third = runner.start("download", "c", "c", lambda job: "c")
    runner.reserve(third, str(tmp_path), 900 * 10**6, "c.gguf")   # finished jobs hold nothing
    runner.wait(third.id, 10)


def test_job_limits_from_the_environment():
    assert jobs.limits_from_env({}) == jobs.DEFAULT_LIMITS
    limits = jobs.limits_from_env({jobs.LIMITS_ENV: "convert=2:0, download=3:6"})
    assert limits["convert"] == jobs.Limit(2, 0) and limits["download"] == jobs.Limit(3, 6)
    assert limits["compare"] == jobs.DEFAULT_LIMITS["compare"]
    for bad in ("convert=0:1", "convert=x", "render=1:1", "convert=1:-1"):
        with pytest.raises(jobs.FluxqError, match=jobs.LIMITS_ENV):
            jobs.limits_from_env({jobs.LIMITS_ENV: bad})
