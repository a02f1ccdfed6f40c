"""What the tab may read and write: the model files the server itself listed inside the configured model folders.

A WebUI is often reachable by others (``--listen``, ``--share``), and every tab event can be called by name over
gradio's API with any value (gradio 4.40 does not check a dropdown's value against its choices). So a file name that
comes from the page is never opened as given: it is a *label* this module handed out ("Stable-diffusion/x.gguf",
relative to the models folder, so the page shows no server paths), looked up in the last scan, and accepted only when
the listed file, with every symlink resolved, still lies inside one of the model folders and fits the action (a Flux
transformer for "Use this", a full-precision one for Convert and Compare). Anything else is refused with the same
line before any file is touched, so the answer says nothing about the existence, size or bytes of other files. A
link that leads out of the model folders is listed as such and never opened.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from lib_fluxq.errors import FluxqError

# The WebUI / ComfyUI model subfolders a models root holds (lib_fluxq.inspect scans these).
DEFAULT_MODEL_FOLDERS = ("Stable-diffusion", "text_encoder", "VAE", "Lora", "unet", "diffusion_models",
                         "text_encoders", "clip", "vae", "loras", "LyCORIS")
OUTSIDE = "outside"   # ListedFile.status of a link that leads out of the model folders


class RefusedPath(FluxqError):
    """A file name from the page that is not a listed file fit for the action."""


@dataclass(frozen=True)
class ListedFile:
    label: str          # what the page shows and sends back
    path: str           # the path as scanned (inside a model folder; may pass through a symlinked subfolder)
    real: str           # the real path (symlinks resolved)
    report: Any = None  # lib_fluxq.inspect FileReport; None for a link leading outside (never opened)

    @property
    def status(self) -> str:
        return OUTSIDE if self.report is None else self.report.status

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


def _shown(text: Any) -> str:
    """A user-given name, safe to repeat in one line: its last part, printable, at most 60 characters."""
    name = os.path.basename(str(text).replace("\\", "/").rstrip("/")) or str(text)
    name = re.sub(r"[\x00-\x1f\x7f]", "?", name)
    return name if len(name) <= 60 else name[:57] + "..."


class Listing:
    """The model files under ``scan_paths`` (a models root or the model folders themselves), rescanned on demand.

    ``inspect_file(path)`` reads one file's header (lib_fluxq.inspect.inspect_file); ``iter_files(path)`` lists the
    model files under a scan path (lib_fluxq.inspect.iter_model_files). Both are passed in so that the module has no
    engine import and the tests can count what was opened.
    """

    def __init__(self, scan_paths: Iterable[str], iter_files: Callable[[str], Iterable[str]],
                 inspect_file: Callable[[str], Any], model_folders: Iterable[str] = DEFAULT_MODEL_FOLDERS) -> None:
        self.scan_paths = [os.path.abspath(p) for p in scan_paths]
        self._iter_files, self._inspect_file = iter_files, inspect_file
        self._model_folders = tuple(model_folders)
        self._lock = threading.Lock()
        self._files: dict[str, ListedFile] = {}

    # -- where the tab may go ---------------------------------------------------------------------------------------
    def roots(self) -> list[str]:
        """Real paths of the model folders: each scan path and the model subfolders it holds (an admin may link
        ``models/Stable-diffusion`` to another disk; a link *inside* a folder that leads elsewhere does not count)."""
        found = []
        for path in self.scan_paths:
            found.append(os.path.realpath(path))
            for sub in self._model_folders:
                if os.path.isdir(os.path.join(path, sub)):
                    found.append(os.path.realpath(os.path.join(path, sub)))
        return sorted(set(found))

    def inside(self, path: str, roots: list[str] | None = None) -> bool:
        """Whether ``path`` (resolved) lies inside a model folder."""
        real = os.path.normcase(os.path.realpath(path))
        for root in roots if roots is not None else self.roots():
            root = os.path.normcase(root)
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return False

    def _label(self, path: str) -> str:
        for base in sorted(self.scan_paths, key=len, reverse=True):
            parent = os.path.dirname(base)
            if path == base or path.startswith(base.rstrip(os.sep) + os.sep):
                return os.path.relpath(path, parent).replace(os.sep, "/")
        return os.path.basename(path)

    def shown_path(self, path: str) -> str:
        """A server path as the page may show it: relative to the models folder's parent."""
        return self._label(os.path.abspath(path))

    def redact(self, text: str) -> str:
        """``text`` (an engine message) with the server's absolute model-folder paths made relative."""
        for base in sorted(self.scan_paths + self.roots(), key=len, reverse=True):
            parent = os.path.dirname(base.rstrip(os.sep))
            if parent and parent != os.sep:
                text = text.replace(parent + os.sep, "")
        return text

    # -- the scan ---------------------------------------------------------------------------------------------------
    def rescan(self) -> list[ListedFile]:
        """List every model file once (by real path); read the header only of files inside the model folders."""
        roots = self.roots()
        files: dict[str, ListedFile] = {}
        seen: set[str] = set()
        for scan_path in self.scan_paths:
            if not os.path.isdir(scan_path):
                continue
            for path in self._iter_files(scan_path):
                path = os.path.abspath(path)
                real = os.path.realpath(path)
                if os.path.normcase(real) in seen:
                    continue
                seen.add(os.path.normcase(real))
                label = self._label(path)
                while label in files:   # two folders with one name (--ckpt-dir elsewhere): keep both apart
                    label += " (2)"
                report = self._inspect_file(path) if self.inside(real, roots) else None
                files[label] = ListedFile(label, path, real, report)
        with self._lock:
            self._files = files
        return self.files()

    def files(self) -> list[ListedFile]:
        """The last scan: readable files first (in scan order), then broken ones and links that lead outside."""
        with self._lock:
            listed = list(self._files.values())
        return sorted(listed, key=lambda f: f.status != "ok")

    def find(self, label: Any, fits: Callable[[ListedFile], bool], what: str) -> ListedFile:
        """The listed file ``label`` if it fits the action (``what`` names what it must be), resolved again now.

        Raises RefusedPath with one line. Nothing is opened here: the header was read at the scan.
        """
        entry = self._files.get(label) if isinstance(label, str) else None
        if entry is None:
            raise RefusedPath(f"'{_shown(label)}' is not a file the tab listed in the model folders; pick one from "
                              f"the list (press Rescan folders after adding files)")
        if entry.report is None:
            raise RefusedPath(f"{entry.label} is a link to a file outside the model folders; the tab only reads and "
                              f"writes inside them: move the file into the folder")
        if entry.report.status != "ok":
            raise RefusedPath(f"{entry.label} could not be read as a model file, so it is not {what}")
        if not fits(entry):
            raise RefusedPath(f"{entry.label} is not {what}")
        # it may have been replaced since the scan (by a link to elsewhere): resolve again before anyone opens it
        real = os.path.realpath(entry.path)
        if not self.inside(real) or not os.path.isfile(real):
            raise RefusedPath(f"{entry.label} is no longer a file in the model folders; press Rescan folders")
        return ListedFile(entry.label, entry.path, real, entry.report)
