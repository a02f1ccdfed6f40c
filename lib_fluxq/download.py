"""Download one file from the Hugging Face Hub into a WebUI models folder, with progress, resume, a disk-space
check, an optional token and cancel.

It speaks to the Hub through huggingface_hub as ``hf_hub_download`` does (``hf_hub_url`` -> ``get_hf_file_metadata``:
HEAD on ``/{repo}/resolve/{revision}/{file}`` for size, etag, commit and redirect -> a GET with ``Range`` through
the hub's own HTTP session), so ``HF_ENDPOINT``, ``HF_TOKEN``/a saved login and a configured HTTP backend behave the
same. It does not call ``hf_hub_download`` itself: that offers neither a progress callback nor a way to stop (and
reads 10 MB at a time), and it writes into a cache layout. Here the bytes go to a hidden ``.partial`` file in the
target folder (kept between attempts, so a stopped or failed download resumes) and are renamed into place only when
the size and, for LFS files, the sha256 match what the Hub announced. An existing file is never overwritten, not
even one that appears while the download runs (``jobs.place_file``: a hard link, which fails when the name exists).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlparse

from lib_fluxq.errors import FluxqError
from lib_fluxq.jobs import DISK_MARGIN, place_file

ProgressCallback = Callable[[int, int, str], None]   # (bytes done, bytes total, text)
SpaceCheck = Callable[[str, int], None]   # (folder, bytes still to write): raises a FluxqError when they do not fit
Token = str | bool | None                 # a token; None: huggingface_hub's own (HF_TOKEN, saved login); False: none
CHUNK = 1 << 20                    # bytes per read: progress and cancel react within one MB
RETRIES = 3                        # resumes after a dropped connection before giving up
RETRY_DELAY = 0.5                  # seconds, doubled per retry
READ_TIMEOUT = 30.0
PROGRESS_EVERY = 0.2               # seconds between progress callbacks (a 12 GB file has ~1.2 M chunks)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = ("1", "true", "yes", "on")


class DownloadError(FluxqError):
    """The download cannot start or could not finish; the message says what to do."""


class DownloadCancelled(FluxqError):
    """Stopped by the caller; the partial file stays for a later resume."""


@dataclass(frozen=True)
class RemoteFile:
    repo: str
    filename: str
    url: str           # where the bytes are (after the Hub's redirect)
    size: int
    etag: str | None
    commit: str | None


@dataclass(frozen=True)
class DownloadResult:
    path: str
    size: int
    resumed_from: int
    seconds: float
    already_present: bool = False
    verified_sha256: bool = False


def endpoint() -> str:
    """The Hub address: ``HF_ENDPOINT`` as set now (tests and mirrors), else huggingface_hub's default."""
    from huggingface_hub import constants
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def offline() -> bool:
    from huggingface_hub import constants
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def page_url(repo: str, filename: str) -> str:
    return f"{endpoint()}/{repo}/blob/main/{filename}"


def _token(token: Token) -> str | bool | None:
    return None if token == "" else token


def resolve(repo: str, filename: str, revision: str = "main", token: Token = None) -> RemoteFile:
    """Ask the Hub for the file's size, etag and location (one HEAD request). Raises DownloadError with the fix."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    if offline():
        raise DownloadError(f"offline mode is on (HF_HUB_OFFLINE): {filename} cannot be downloaded now; unset "
                            f"HF_HUB_OFFLINE, or fetch it yourself from {page_url(repo, filename)}")
    base = endpoint()
    url = hf_hub_url(repo, filename, revision=revision, endpoint=base)
    try:
        meta = get_hf_file_metadata(url, token=_token(token))
    except Exception as exc:
        raise _hub_error(exc, repo, filename, base) from None
    if meta.size is None:
        raise DownloadError(f"{base} did not say how large {repo}/{filename} is; try again later")
    return RemoteFile(repo=repo, filename=filename, url=meta.location or url, size=int(meta.size),
                      etag=meta.etag, commit=meta.commit_hash)


def _hub_error(exc: Exception, repo: str, filename: str, base: str) -> DownloadError:
    """huggingface_hub's exceptions -> one sentence naming the file and what to do."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    page = f"{base}/{repo}"
    if isinstance(exc, GatedRepoError):
        return DownloadError(f"{repo} is gated: accept its licence at {page} while logged in, then paste a read "
                             f"token (https://huggingface.co/settings/tokens) into the token field")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(f"{repo} was not found or needs a token: check the name, or give a read token if it "
                             f"is private/gated ({page})")
    if isinstance(exc, EntryNotFoundError):
        return DownloadError(f"{filename} is not in {repo} (it may have been renamed): see {page}/tree/main")
    if isinstance(exc, LocalEntryNotFoundError) or type(exc).__name__ in ("ConnectionError", "Timeout",
                                                                           "ConnectTimeout", "ReadTimeout"):
        return DownloadError(f"cannot reach {base} ({type(exc).__name__}); check the connection, proxy or "
                             f"HF_ENDPOINT and try again — the download resumes where it stopped")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        if status == 401:
            return DownloadError(f"{base} refused the token for {repo} (HTTP 401): paste a valid read token")
        return DownloadError(f"{base} answered HTTP {status} for {repo}/{filename}; try again later")
    return DownloadError(f"{repo}/{filename}: {type(exc).__name__}: {exc}")


def partial_path(dest: str, remote: RemoteFile) -> str:
    """The resumable temp file: hidden, in the target folder, named after the content (etag) it is a prefix of."""
    tag = re.sub(r"[^0-9A-Za-z]", "", remote.etag or "")[:16] or "noetag"
    return os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.{tag}.partial")


class _Sink:
    """The file object http_get writes to: appends, hashes, reports progress, stops on cancel."""

    def __init__(self, handle, start: int, total: int, hasher, progress: ProgressCallback | None,
                 cancel: threading.Event | None, label: str) -> None:
        self.handle, self.done, self.total, self.hasher = handle, start, total, hasher
        self.progress, self.cancel, self.label = progress, cancel, label
        self.name = handle.name     # hf_transfer (when enabled) writes by name
        self._last = 0.0

    def write(self, chunk: bytes) -> int:
        if self.cancel is not None and self.cancel.is_set():
            raise DownloadCancelled(f"download of {self.label} stopped; start it again to resume")
        self.handle.write(chunk)
        if self.hasher is not None:
            self.hasher.update(chunk)
        self.done += len(chunk)
        now = time.monotonic()
        if self.progress is not None and (now - self._last >= PROGRESS_EVERY or self.done >= self.total):
            self._last = now
            self.progress(self.done, self.total, f"{_mb(self.done)} of {_mb(self.total)}")
        return len(chunk)

    def tell(self) -> int:
        return self.handle.tell()

    def flush(self) -> None:
        self.handle.flush()


def download(repo: str, filename: str, folder: str | os.PathLike[str], revision: str = "main",
             token: Token = None, progress: ProgressCallback | None = None,
             cancel: threading.Event | None = None, remote: RemoteFile | None = None,
             space_check: SpaceCheck | None = None) -> DownloadResult:
    """Fetch ``repo/filename`` into ``folder`` (created if missing). Resumes a previous partial download.

    ``space_check(folder, bytes)`` replaces the plain free-space check (the tab's counts the jobs in flight).
    """
    import filelock  # a huggingface_hub dependency: present wherever the hub is

    started = time.monotonic()
    folder = os.fspath(folder)
    dest = os.path.join(folder, os.path.basename(filename))
    remote = remote or resolve(repo, filename, revision, token)
    if os.path.exists(dest):
        if os.path.getsize(dest) == remote.size:
            return DownloadResult(dest, remote.size, 0, time.monotonic() - started, already_present=True)
        raise DownloadError(f"{dest} already exists with a different size ({_mb(os.path.getsize(dest))}, the Hub "
                            f"has {_mb(remote.size)}); rename or delete it first — it is never overwritten")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create the folder {folder} ({exc.strerror}); create it or choose another "
                            f"models folder") from None
    partial = partial_path(dest, remote)
    lock = filelock.FileLock(partial + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        raise DownloadError(f"another download is already writing {dest}; wait for it to finish") from None
    try:
        return _download_locked(remote, dest, partial, token, progress, cancel, started, space_check)
    finally:
        lock.release()
        with contextlib.suppress(OSError):
            os.remove(partial + ".lock")


def _download_locked(remote: RemoteFile, dest: str, partial: str, token: Token,
                     progress: ProgressCallback | None, cancel: threading.Event | None,
                     started: float, space_check: SpaceCheck | None) -> DownloadResult:
    from huggingface_hub.utils import build_hf_headers
    folder = os.path.dirname(dest)
    have = os.path.getsize(partial) if os.path.exists(partial) else 0
    if have > remote.size:   # not a prefix of this file: start over
        os.remove(partial)
        have = 0
    if space_check is not None:
        space_check(folder, remote.size - have)
    else:
        _check_space(dest, remote.size - have)
    hasher = hashlib.sha256() if remote.etag and _SHA256.match(remote.etag) else None
    if hasher is not None and have:
        if progress is not None:
            progress(0, remote.size, f"checking the {_mb(have)} already downloaded")
        with open(partial, "rb") as existing:
            for block in iter(lambda: existing.read(8 << 20), b""):
                hasher.update(block)
    headers = build_hf_headers(token=_token(token))
    if urlparse(remote.url).netloc != urlparse(endpoint()).netloc:
        headers.pop("authorization", None)   # as hf_hub_download: the token is for the Hub, not for its CDN
    label = os.path.basename(dest)
    with open(partial, "ab") as handle:
        sink = _Sink(handle, have, remote.size, hasher, progress, cancel, label)
        if progress is not None:
            progress(have, remote.size, f"{'resuming at ' + _mb(have) if have else 'starting'}")
        if have < remote.size:   # a complete download kept from before (its name was taken) needs no request
            _transfer(remote, sink, headers, label)
    size = os.path.getsize(partial)
    if size != remote.size:
        raise DownloadError(f"{label}: got {size} bytes, the Hub announced {remote.size}; start again to resume")
    if hasher is not None and hasher.hexdigest() != remote.etag:
        os.remove(partial)   # corrupt: resuming would keep the bad bytes
        raise DownloadError(f"{label}: sha256 does not match the Hub's ({remote.etag}); the partial file was "
                            f"removed, start again")
    try:
        place_file(partial, dest)
    except FileExistsError:
        raise DownloadError(f"{dest} appeared while {label} was downloading; it is never overwritten: rename or "
                            f"delete it and start again (the download is kept and completes at once)") from None
    return DownloadResult(dest, size, have, time.monotonic() - started, verified_sha256=hasher is not None)


def _check_space(dest: str, needed: int) -> None:
    folder = os.path.dirname(dest)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed + DISK_MARGIN:
        raise DownloadError(f"not enough space for {os.path.basename(dest)} in {folder}: it needs "
                            f"{_mb(needed + DISK_MARGIN)}, {_mb(free)} free; free some space or choose another "
                            f"models folder")


def _transfer(remote: RemoteFile, sink: _Sink, headers: dict[str, str], label: str) -> None:
    """GET the rest of the file (``Range`` from what ``sink`` holds) through huggingface_hub's HTTP session.

    Own loop instead of ``file_download.http_get``: that one reads 10 MB per chunk, so progress and cancel would
    only move every 10 MB (minutes on a slow line). Transient network errors resume up to ``RETRIES`` times.
    """
    import requests
    from huggingface_hub.utils import get_session, hf_raise_for_status

    for attempt in range(RETRIES + 1):
        request_headers = dict(headers)
        if sink.done:
            request_headers["Range"] = f"bytes={sink.done}-"
        try:
            with get_session().get(remote.url, headers=request_headers, stream=True,
                                   timeout=READ_TIMEOUT) as response:
                hf_raise_for_status(response)
                if sink.done and response.status_code != 206:
                    raise DownloadError(f"{remote.url} ignored the resume request (HTTP {response.status_code}); "
                                        f"delete {sink.name} and start again")
                for chunk in response.iter_content(chunk_size=CHUNK):
                    sink.write(chunk)
            if sink.done >= remote.size:
                return
            raise requests.ConnectionError(f"connection closed at {_mb(sink.done)} of {_mb(remote.size)}")
        except (DownloadCancelled, DownloadError):
            raise
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == RETRIES:
                raise DownloadError(f"{label}: the connection keeps failing ({type(exc).__name__}) at "
                                    f"{_mb(sink.done)} of {_mb(remote.size)}; start again to resume") from None
            time.sleep(min(2 ** attempt, 10) * RETRY_DELAY)
        except OSError as exc:
            raise DownloadError(f"writing {sink.name} failed ({exc.strerror or exc}); the download resumes from "
                                f"{_mb(sink.done)} next time") from None
        except Exception as exc:
            raise _hub_error(exc, remote.repo, remote.filename, endpoint()) from None


def _mb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
