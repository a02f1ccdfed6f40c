"""Expected user errors (a Flux file with parts missing) reported as ONE line in the UI and ONE in the console; every
other exception left exactly as the WebUI reports it.

How Forge and Neo report an error raised while generating (read in their source):
- UI: ``modules_forge.main_thread.Task.work`` catches it, prints ``traceback.print_exc()`` (Forge then also
  ``print(e)``), and keeps it in ``main_thread.last_exception`` (Forge: the exception object; Neo: the text
  "Type: message"); ``modules/call_queue.py`` shows "Type: message" in the page's error box.
- API: ``modules/api/api.py`` ``handle_exception`` prints the message and a traceback, except for a FastAPI
  ``HTTPException`` (FastAPI answers those itself with ``{"detail": ...}`` and prints nothing).

So the host layer raises a user error whose text is one line and which is also an ``HTTPException`` (500, as the
WebUI answers a missing part itself), and, only while a generation task runs, makes ``main_thread``'s
``traceback.print_exc`` skip such errors. No frame of ours is added to any other exception's traceback.
"""

from __future__ import annotations

import sys
import threading
import traceback
import types
from collections.abc import Callable
from typing import Any

from lib_fluxq.pairing import MissingComponentsError

_task = threading.local()   # .running: inside Task.work (the UI path reports the error itself)
_classes: dict[type, type] = {}


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def user_error_class(base: type = MissingComponentsError) -> type:
    """``base`` with a one-line message, also a FastAPI ``HTTPException`` where FastAPI is installed (so the WebUI's
    API answers it without a traceback). Same name as ``base``: the UI shows "MissingComponentsError: ..."."""
    if base in _classes:
        return _classes[base]
    bases: tuple[type, ...] = (base,)
    try:
        from fastapi import HTTPException
        # first, so that base's cooperative super().__init__(message) reaches Exception, not HTTPException
        bases = (HTTPException, base)
    except ImportError:
        pass

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        self.detail = one_line(Exception.__str__(self))
        self.status_code = 500
        self.headers = None

    def __str__(self: Any) -> str:
        return self.detail

    cls = type(base.__name__, bases, {"__init__": __init__, "__str__": __str__, "__repr__": __str__,
                                      "__module__": base.__module__, "__qualname__": base.__qualname__})
    _classes[base] = cls
    return cls


def is_user_error(exc: BaseException | None) -> bool:
    return exc is not None and type(exc) in _classes.values()


def ui_task_running() -> bool:
    return bool(getattr(_task, "running", False))


def wrap_task_work(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Task.work``: mark the thread as running a generation task (so the hook knows the UI reports errors)."""
    def work(self: Any, *args: Any, **kwargs: Any) -> Any:
        previous = ui_task_running()
        _task.running = True
        try:
            return original(self, *args, **kwargs)
        finally:
            _task.running = previous
    return work


def quiet_traceback_module(host_prints_message: bool, log: Callable[[str], None]) -> types.ModuleType:
    """A stand-in for the ``traceback`` module inside ``main_thread``: ``print_exc`` prints our user errors as one
    line (or nothing, where the host prints the message itself right after), everything else as before."""
    proxy = types.ModuleType("traceback")
    proxy.__dict__.update({k: v for k, v in vars(traceback).items() if not k.startswith("__")})

    def print_exc(*args: Any, **kwargs: Any) -> None:
        exc = sys.exc_info()[1]
        if not is_user_error(exc):
            traceback.print_exc(*args, **kwargs)
        elif not host_prints_message:
            log(str(exc))

    proxy.print_exc = print_exc
    return proxy
