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
    args = build_parser(chosen).parse_args(argv)
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except FluxqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head`): stop quietly, and keep Python from failing again when it flushes stdout
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
