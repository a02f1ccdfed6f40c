"""WebUI entry point (Forge and A1111 load every file in scripts/): the Flux Quant tab."""

import os
import sys

from modules import script_callbacks

# The WebUI loads this file by path; lib_fluxq lives in the extension's root folder.
_EXTENSION_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _EXTENSION_ROOT not in sys.path:
    sys.path.insert(0, _EXTENSION_ROOT)


def on_ui_tabs():
    from lib_fluxq.ui.host import current_host
    from lib_fluxq.ui.tab import build_tab
    return [(build_tab(current_host()), "Flux Quant", "fluxq_tab")]


script_callbacks.on_ui_tabs(on_ui_tabs)
