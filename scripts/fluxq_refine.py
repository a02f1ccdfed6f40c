"""WebUI entry point: the "fluxq refine" AlwaysVisible script (txt2img + img2img; Forge and A1111).

All logic lives in lib_fluxq.host.refine_host (WebUI side) and lib_fluxq.refine (host-free). The WebUI registers
every scripts.Script subclass found in this module's namespace, so only that one class is imported here.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:  # WebUIs load script files by path; the extension root is not importable otherwise
    sys.path.insert(0, _ROOT)

from lib_fluxq.host.refine_host import FluxqRefineScript  # noqa: E402,F401
