"""The parts of the A1111 WebUI that Forge dfdcbab6 and Forge Neo both keep and that fluxq touches, for the Forge
and Neo stand-ins (tests/forge_standin.py, tests/neo_standin.py) and for a bare A1111-like host (no modules_forge).

Written from reading stable-diffusion-webui's shape as Forge dfdcbab6 and Neo 2.26 carry it, not copied:
modules/shared.py ``opts`` (``Options.set`` looks the key up in ``data_labels``, runs its ``onchange``),
modules/sd_models.py checkpoints (``CheckpointInfo`` name/title/short_title, ``get_closet_checkpoint_match``,
``select_checkpoint``), modules/script_callbacks.py, modules/infotext_utils.py (``quote``, ``re_param``, the
"Module N" → "VAE/TE" step of ``parse_generation_parameters``), modules/call_queue.py (the error box built from
``main_thread.last_exception``) and modules/api/api.py ``handle_exception`` (no traceback for an HTTPException;
FastAPI answers those itself with ``{"detail": ...}``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
import traceback
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

A1111_MODULES = ("modules", "modules.shared", "modules.paths", "modules.script_callbacks", "modules.sd_models",
                 "modules.infotext_utils", "modules.call_queue", "modules.api", "modules.api.api")


def mod(name: str) -> Any:
    return sys.modules[name]


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None,
                 **kwargs):
        self.default, self.label, self.section, self.onchange = default, label, section, onchange


class Options:
    """shared.opts: ``data`` plus ``data_labels``; ``set`` refuses unknown keys (it looks up data_labels[key])."""

    def __init__(self, labels: dict[str, OptionInfo]) -> None:
        object.__setattr__(self, "data_labels", dict(labels))
        object.__setattr__(self, "data", {k: v.default for k, v in labels.items()})
        object.__setattr__(self, "saved", 0)

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        if self.data.get(key) == value:
            return False
        option = self.data_labels[key]
        self.data[key] = value
        if run_callbacks and option.onchange is not None:
            option.onchange()
        return True

    def save(self, filename: str) -> None:
        object.__setattr__(self, "saved", self.saved + 1)

    def get_default(self, key: str) -> Any:
        info = self.data_labels.get(key)
        return info.default if info else None

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def __getattr__(self, item: str) -> Any:
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)


class Callbacks:
    def __init__(self) -> None:
        self.ui_settings: list[Any] = []
        self.model_loaded: list[Any] = []
        self.ui_tabs: list[Any] = []
        self.errors: list[BaseException] = []

    def model_loaded_callback(self, sd_model: Any) -> None:
        for c in self.model_loaded:
            try:
                c(sd_model)
            except Exception as exc:   # the WebUI reports and continues
                self.errors.append(exc)


# ---------------------------------------------------------------------------------------------------------------
# modules/sd_models.py: checkpoints


class CheckpointInfo:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        root = os.path.join(mod("modules.paths").models_path, "Stable-diffusion")
        name = os.path.relpath(filename, root) if filename.startswith(root) else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.shorthash = None          # the WebUI hashes lazily; the titles have no " [hash]" until then
        self.title = name
        self.short_title = self.name_for_extra
        self.sha256 = None

    def calculate_shorthash(self) -> str | None:
        return self.shorthash


def list_models() -> None:
    sd_models = mod("modules.sd_models")
    sd_models.checkpoints_list.clear()
    sd_models.checkpoint_aliases.clear()
    root = os.path.join(mod("modules.paths").models_path, "Stable-diffusion")
    for folder, _, names in os.walk(root):
        for name in sorted(names):
            if name.lower().endswith((".safetensors", ".ckpt", ".gguf")):
                info = CheckpointInfo(os.path.join(folder, name))
                sd_models.checkpoints_list[info.title] = info
                for alias in (info.title, info.name, info.short_title, info.name_for_extra):
                    sd_models.checkpoint_aliases[alias] = info


def get_closet_checkpoint_match(search_string: str) -> Any:
    sd_models = mod("modules.sd_models")
    if not search_string:
        return None
    if search_string in sd_models.checkpoint_aliases:
        return sd_models.checkpoint_aliases[search_string]
    found = sorted([i for i in sd_models.checkpoints_list.values() if search_string in i.title],
                   key=lambda i: len(i.title))
    return found[0] if found else None


def select_checkpoint() -> Any:
    sd_models, opts = mod("modules.sd_models"), mod("modules.shared").opts
    info = sd_models.checkpoint_aliases.get(opts.sd_model_checkpoint)
    if info is not None:
        return info
    return next(iter(sd_models.checkpoints_list.values()), None)


# ---------------------------------------------------------------------------------------------------------------
# modules/infotext_utils.py


re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def quote(text: Any) -> Any:
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str) -> dict[str, Any]:
    """The key/value part of the WebUI's parser plus its "VAE / TE" step: every "Module N" names a module the
    paste selects (matched to main_entry.module_list by file name without extension)."""
    *_, lastline = x.strip().split("\n")
    res: dict[str, Any] = {}
    for k, v in re_param.findall(lastline):
        res[k] = unquote(v)
    modules = []
    for key in res:
        if key.startswith("Module "):
            for known in mod("modules_forge.main_entry").module_list:
                if res[key] == os.path.splitext(known)[0]:
                    modules.append(known)
                    break
            else:
                modules.append(res[key])
    if modules:
        current = [os.path.basename(m) for m in mod("modules.shared").opts.forge_additional_modules]
        if sorted(modules) != sorted(current):
            res["VAE/TE"] = modules
    return res


def module_generation_params(modules: list[str]) -> dict[str, str]:
    """processing.create_infotext's loop: "Module N" = the file name without extension."""
    return {f"Module {i + 1}": os.path.splitext(os.path.basename(m))[0] for i, m in enumerate(modules)}


def infotext_text(prompt: str, params: dict[str, Any]) -> str:
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{prompt}\n{text}".strip()


# ---------------------------------------------------------------------------------------------------------------
# modules/call_queue.py (the error box) and modules/api/api.py (handle_exception)


def gradio_error_box(call: Callable[[], Any]) -> str | None:
    """wrap_gradio_call_no_job: None when ``call`` returned a list, else the error box text it would show."""
    main_thread = mod("modules_forge.main_thread")
    try:
        list(call())
        return None
    except Exception as e:
        if main_thread.last_exception is not None:
            shown: Any = main_thread.last_exception
        else:
            traceback.print_exc()
            shown = e
        return mod("modules.call_queue").error_text(shown)


def api_request(call: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
    """An API route calling ``call``: FastAPI answers an HTTPException itself; anything else reaches the WebUI's
    handle_exception, which prints "API error" and the traceback (errors.report)."""
    from fastapi.exceptions import HTTPException

    try:
        call()
        return 200, {}
    except HTTPException as e:
        return e.status_code, {"detail": e.detail}
    except Exception as e:
        err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""),
               "errors": str(e)}
        for line in f"API error: POST: http://127.0.0.1:7860/sdapi/v1/txt2img {err}".splitlines():
            print("***", line, file=sys.stderr)
        print(textwrap.indent(traceback.format_exc(), "    "), file=sys.stderr)
        print("---", file=sys.stderr)
        return vars(e).get("status_code", 500), err


# ---------------------------------------------------------------------------------------------------------------
# Installing


def new_modules(names: tuple[str, ...]) -> dict[str, types.ModuleType]:
    for name in names:
        if name in sys.modules:
            raise RuntimeError(f"a real '{name}' is already imported; the stand-in would shadow it")
    m = {name: types.ModuleType(name) for name in names}
    for name in names:   # every parent of another stand-in module is a package
        if any(other.startswith(name + ".") for other in names):
            m[name].__path__ = []
    return m


def publish(m: dict[str, types.ModuleType]) -> None:
    for name, module in m.items():
        sys.modules[name] = module
    for name, module in m.items():
        parent, _, child = name.rpartition(".")
        if parent in m:
            setattr(m[parent], child, module)


def install_a1111_core(m: dict[str, types.ModuleType], models_path: Path, labels: dict[str, OptionInfo],
                       cmd_opts: dict[str, Any]) -> None:
    """Fill the A1111-level modules in ``m`` (created by ``new_modules``)."""
    m["modules.shared"].opts = Options({"sd_model_checkpoint": OptionInfo(None),
                                        "sd_checkpoint_dropdown_use_short": OptionInfo(False), **labels})
    m["modules.shared"].OptionInfo = OptionInfo
    m["modules.shared"].cmd_opts = types.SimpleNamespace(**cmd_opts)
    m["modules.shared"].config_filename = str(models_path.parent / "config.json")
    m["modules.shared"].sd_model = None
    m["modules.paths"].models_path = str(models_path)
    callbacks = Callbacks()
    sc = m["modules.script_callbacks"]
    sc.callbacks = callbacks
    sc.on_ui_settings = lambda fn, name=None: callbacks.ui_settings.append(fn)
    sc.on_model_loaded = lambda fn, name=None: callbacks.model_loaded.append(fn)
    sc.on_ui_tabs = lambda fn, name=None: callbacks.ui_tabs.append(fn)
    sc.model_loaded_callback = callbacks.model_loaded_callback
    sm = m["modules.sd_models"]
    sm.checkpoints_list, sm.checkpoint_aliases = {}, {}
    sm.list_models, sm.get_closet_checkpoint_match = list_models, get_closet_checkpoint_match
    sm.select_checkpoint, sm.CheckpointInfo = select_checkpoint, CheckpointInfo
    iu = m["modules.infotext_utils"]
    iu.quote, iu.unquote, iu.parse_generation_parameters = quote, unquote, parse_generation_parameters
    for folder in ("VAE", "text_encoder", "Stable-diffusion", "Lora"):
        (models_path / folder).mkdir(parents=True, exist_ok=True)


def install_a1111(models_path: Path) -> dict[str, types.ModuleType]:
    """A bare A1111-like host: the A1111 modules, no modules_forge, no backend."""
    m = new_modules(A1111_MODULES)
    install_a1111_core(m, models_path, {}, {"ckpt_dir": None, "vae_dir": None, "lora_dir": None})
    publish(m)
    return m


def remove(names: tuple[str, ...]) -> None:
    """Drop the stand-in's modules and everything imported under its packages."""
    tops = {n.split(".")[0] for n in names}
    for name in list(sys.modules):
        if name in names or name.split(".")[0] in tops:
            sys.modules.pop(name, None)
