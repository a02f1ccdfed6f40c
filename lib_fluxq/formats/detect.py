"""What is this file? Decided from the file system and the file's first bytes, never from its name.

Every reader (inspect, convert, compare, the tab, the loader hook) opens model files through ``open_model_file`` /
``identify``, so a bad input gets the same one-line diagnosis everywhere: a missing path, a symlink loop or a dangling
link, a folder, a pipe, a file without read permission, an empty file, a pickle checkpoint, a saved web page, a text
file or unrecognised bytes, each with what to do.

Messages never quote bytes read from a file: until a file is known to be GGUF or safetensors by its structure, they
only say which kind of file it is (or is not). A web UI may be asked to open any path; echoing the first bytes
(e.g. as a "header length") would leak the content of files that are not models.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

from lib_fluxq.errors import FormatError

GGUF_MAGIC = b"GGUF"
SNIFF_BYTES = 512
SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
# Kinds this module tells apart.
GGUF = "gguf"
SAFETENSORS = "safetensors"
SAFETENSORS_TRUNCATED = "safetensors-truncated"
PICKLE = "pickle"
EMPTY = "empty"
HTML = "html"
TEXT = "text"
UNKNOWN = "unknown"
MODEL_KINDS = (GGUF, SAFETENSORS)

REFETCH = "the file is damaged or truncated; download it again"
# kind -> (what the file is, what to do)
_NOT_A_MODEL: dict[str, tuple[str, str]] = {
    EMPTY: ("is empty: 0 bytes", "the download or copy did not finish; download it again"),
    SAFETENSORS_TRUNCATED: ("is a truncated safetensors file: its header runs past the end of the file", REFETCH),
    PICKLE: ("is a pickle checkpoint, the PyTorch .ckpt/.pt format, which fluxq never loads because loading a "
             "pickle can run code", "use the .safetensors or .gguf release of this model"),
    HTML: ("is a web page, not a model file",
           "the download saved an error or login page instead of the model; download it again, with a Hugging "
           "Face token for gated models"),
    TEXT: ("is a text file, not a model file", "give the .safetensors or .gguf model file"),
    UNKNOWN: ("is not a GGUF file, nor a safetensors file: its first bytes match neither format",
              "the file is damaged or not a model; download it again"),
}


@dataclass(frozen=True)
class Identified:
    """A regular, readable file and what its first bytes say it is."""

    path: str
    kind: str          # one of the kinds above
    size: int


def identify(path: str | os.PathLike[str]) -> Identified:
    """Open ``path`` read-only, check it is a readable regular file and sniff its kind.

    Raises FormatError (file, what is wrong, what to do) for anything that is not a readable regular file.
    """
    path = os.fspath(path)
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = _read_head(path, fd, min(size, SNIFF_BYTES))
    finally:
        os.close(fd)
    return Identified(path, sniff(head, size), size)


def sniff(head: bytes, size: int) -> str:
    """The kind of a file of ``size`` bytes that starts with ``head``."""
    if size == 0:
        return EMPTY
    if head[:4] == GGUF_MAGIC:
        return GGUF
    if len(head) >= 9:
        # safetensors: u64 length of a JSON header, then the JSON. A length that fits the file is itself a strong
        # sign (8 random or text bytes read as a length are astronomically large); a JSON object that starts right
        # after a length past the end is a safetensors file cut short.
        header_length = struct.unpack("<Q", head[:8])[0]
        json_like = head[8:9] in b'{["' or head[8:9].isspace()
        if json_like and 2 <= header_length <= min(size - 8, SAFETENSORS_MAX_HEADER):
            return SAFETENSORS
        if head[8:9] == b"{" and header_length > size - 8:
            return SAFETENSORS_TRUNCATED
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return PICKLE  # PyTorch's zip checkpoint, or a bare pickle stream (protocol 2-5)
    text = _as_text(head)
    if text is not None:
        start = text.lstrip().lower()
        return HTML if start.startswith(("<!doctype html", "<html", "<head", "<body")) else TEXT
    return UNKNOWN


def not_a_model(found: Identified, wanted: str = "a safetensors or GGUF model file") -> FormatError:
    """The error for a file whose kind is not what the caller reads (``wanted`` names what it needed)."""
    if found.kind == GGUF:
        return FormatError(found.path, f"is a GGUF file, not {wanted}", fix="give a file of the expected format")
    if found.kind == SAFETENSORS:
        return FormatError(found.path, f"is a safetensors file, not {wanted}",
                           fix="give a file of the expected format")
    reason, fix = _NOT_A_MODEL[found.kind]
    return FormatError(found.path, reason, fix=fix)


def require(path: str | os.PathLike[str], kind: str) -> Identified:
    """``identify(path)``, raising the matching FormatError unless the file is of ``kind`` (GGUF / SAFETENSORS)."""
    found = identify(path)
    if found.kind != kind:
        raise not_a_model(found, {GGUF: "a GGUF file", SAFETENSORS: "a safetensors file"}[kind])
    return found


def require_model(path: str | os.PathLike[str]) -> Identified:
    """``identify(path)``, raising the matching FormatError unless it is a GGUF or safetensors file."""
    found = identify(path)
    if found.kind not in MODEL_KINDS:
        raise not_a_model(found)
    return found


def open_regular(path: str) -> int:
    """An O_RDONLY descriptor of the regular file ``path``, or a FormatError that says why not.

    A pipe or device is refused before it is opened (opening a FIFO would block until a writer appears).
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise path_error(path, exc) from None
    _check_mode(path, st.st_mode)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise path_error(path, exc) from None
    try:
        _check_mode(path, os.fstat(fd).st_mode)  # the path may have been swapped since the stat
    except BaseException:
        os.close(fd)
        raise
    return fd


def path_error(path: str, exc: OSError) -> FormatError:
    """An OS error on ``path`` as one user-facing FormatError (loop, dangling link, permission, ...)."""
    code = exc.errno
    if code == errno.ELOOP:
        return FormatError(path, "is a symbolic link loop: the link leads back to itself",
                           fix="fix or remove the link")
    if code == errno.ENOENT:
        if os.path.islink(path):
            return FormatError(path, f"is a symbolic link to a missing file, {_link_target(path)}",
                               fix="fix or remove the link")
        return FormatError(path, "file not found", fix="check the path")
    if code == errno.ENOTDIR:
        return FormatError(path, "file not found: a part of the path is a file, not a folder", fix="check the path")
    if code in (errno.EACCES, errno.EPERM):
        return FormatError(path, "cannot be read: permission denied",
                           fix="give your user read permission (chmod a+r) or run as the file's owner")
    if code == errno.EISDIR:
        return FormatError(path, "is a folder, not a model file", fix="give a .safetensors or .gguf file")
    return FormatError(path, f"cannot be read: {exc.strerror or type(exc).__name__}",
                       fix="check the disk and the path")


def _check_mode(path: str, mode: int) -> None:
    if stat.S_ISDIR(mode):
        raise FormatError(path, "is a folder, not a model file", fix="give a .safetensors or .gguf file")
    if not stat.S_ISREG(mode):
        raise FormatError(path, "is not a regular file but a pipe, socket or device", fix="give the model file itself")


def _read_head(path: str, fd: int, n: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    try:
        while got < n:
            chunk = os.read(fd, n - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except OSError as exc:
        raise path_error(path, exc) from None
    return b"".join(parts)


def _as_text(head: bytes) -> str | None:
    """``head`` decoded when it reads as text (UTF-8, printable), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sniffed bytes
            return None
        text = head[:exc.start].decode("utf-8")
    if not text.strip():
        return None
    printable = sum(ch.isprintable() or ch in "\t\r\n\f" for ch in text)
    return text if printable >= 0.95 * len(text) else None


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "unknown target"
