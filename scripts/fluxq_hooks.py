"""WebUI entry point: installs fluxq's load hook and its Settings section where the WebUI has Forge's model loader
(Forge, Forge Neo); elsewhere (A1111, reForge main) one console line says what is off."""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # WebUIs load script files by path; the extension root is not importable otherwise
    sys.path.insert(0, _ROOT)

from lib_fluxq.host import forge as _forge_host  # noqa: E402

_forge_host.register_callbacks()
