"""The `dt-trio` command (and `python -m dt_trio`): an operator command when the first
argument names one, else the sidecar. Chosen before either is imported, so the operator
commands' parsing and --help load neither trio nor the engine."""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from dt_trio._ops import GROUPS

    if args and args[0] in GROUPS:
        from dt_trio._ops import main as operate

        return operate(args)
    from dt_trio._cli import main as serve

    return serve(args)
