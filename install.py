"""Run by the WebUI launcher on start: installs only the runtime packages the host lacks, one line per action.

Never touches what the WebUI itself pins (torch, numpy, gradio, transformers, protobuf): a mismatch there breaks
the WebUI. Inside Forge, ``gguf`` is Forge's own vendored copy, so nothing is installed there at all.
"""

import importlib.util
import os

import launch  # the WebUI's launcher module (A1111 and Forge both provide it)

NEVER_TOUCH = {"torch", "numpy", "gradio", "transformers", "protobuf"}
IMPORT_NAMES = {"libggml-python": "ggml"}   # distribution name -> module name where they differ


def _requirements(path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            spec = line.split("#", 1)[0].strip()
            if spec:
                yield spec


def _vendored_by_forge(module):
    """Forge ships gguf-py under packages_3rdparty/ and puts it on sys.path only after installers ran."""
    return os.path.isdir(os.path.join(os.getcwd(), "packages_3rdparty", module))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for spec in _requirements(os.path.join(here, "requirements.txt")):
        name = spec.split("==")[0].split(">=")[0].split("<")[0].strip()
        if name.lower() in NEVER_TOUCH:
            continue
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        if importlib.util.find_spec(module) is not None or _vendored_by_forge(module):
            continue
        print(f"[fluxq] installing {spec} (missing from this WebUI)")
        launch.run_pip(f"install {spec}", f"fluxq requirement: {spec}")


main()
