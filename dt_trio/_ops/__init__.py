"""The operator commands, `dt-trio instances ...` and `dt-trio entities ...`: a client of any
sidecar of the TaskHubSidecarService protocol (purerpc under trio, imported only once the
arguments are parsed).

Exit status: 0 on success, 1 when the sidecar answers an error or cannot be reached (its gRPC
status name and message on stderr), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence

GROUPS = ("instances", "entities")


def main(argv: Sequence[str]) -> int:
    """Run one operator command, `argv` starting with its group; the exit status."""
    from dt_trio._ops._args import parse

    try:
        args = parse(argv)
        from dt_trio._ops._sidecar import SidecarError

        module = importlib.import_module(f"dt_trio._ops._{args.group}")
        command: Callable[[argparse.Namespace], int] = module.COMMANDS[args.command]
        try:
            return command(args)
        except SidecarError as exc:
            print(f"dt-trio: {exc}", file=sys.stderr)
            return 1
    except SystemExit as exc:  # argparse: --help, or a usage error
        return exc.code if isinstance(exc.code, int) else 2
    except KeyboardInterrupt:
        print("dt-trio: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dt-trio instances list | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's last flush is quiet
        return 1
