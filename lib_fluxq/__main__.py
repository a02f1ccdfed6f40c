"""Command line: ``python -m lib_fluxq <command> ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``; they are imported
only when chosen, so ``--help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from lib_fluxq.errors import FluxqError

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("lib_fluxq.inspect", "what is this model file / folder (header only, never tensor data)"),
    "advise": ("lib_fluxq.advisor", "recommend quant level, resolution, GPU Weights and text-encoder plan"),
    "convert": ("lib_fluxq.convert", "convert a Flux transformer to a GGUF type or NF4"),
    "compare": ("lib_fluxq.compare", "quantization-level table measured on real Flux blocks"),
    "ui": ("lib_fluxq.ui.app", "the Flux Quant tab as a standalone web app"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lib_fluxq", description="fluxq: quantized Flux tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            importlib.import_module(module_name).add_arguments(command_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    if chosen not in COMMANDS:
        chosen = None
    try:
        args = build_parser(chosen).parse_args(argv)
        if args.command is None:
            build_parser().print_help()
            return 2
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except FluxqError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, and keep Python from failing again when it flushes stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file problem no command turned into its own message: still one line naming the file
        if exc.filename is not None:
            from lib_fluxq.formats.detect import path_error

            return _fail(str(path_error(os.fsdecode(exc.filename), exc)))
        return _fail(f"{exc.strerror or exc} (check the disk and the paths given)")
    except ImportError as exc:  # a runtime dependency missing or broken in this environment
        what = f"the Python package '{exc.name}'" if exc.name else "a Python package"
        return _fail(f"{what} cannot be imported ({exc.msg}); install the runtime requirements: "
                     "pip install -r requirements.txt (and requirements-ui.txt for the tab)")
    except MemoryError:
        return _fail("out of memory (close other programs, or use smaller --blocks / --res)")
    except Exception as exc:  # a bug in fluxq: one line, and the traceback only on request
        if os.environ.get("FLUXQ_TRACEBACK"):
            raise
        # the exception's text is left out: it may quote bytes of the file being read
        return _fail(f"internal error in fluxq ({type(exc).__name__}); please report it, with the traceback that "
                     "FLUXQ_TRACEBACK=1 shows", code=70)


def _fail(message: str, code: int = 1) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
