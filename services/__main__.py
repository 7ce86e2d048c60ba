"""The console script `cargotrack` (and `python -m services`).

Its first act, for `cargotrack serve`, is to note SIGTERM and SIGINT
(`shared.early_signals`) before importing anything else: the command-line parser, the
settings, the development commands' entry points and the service's modules take about
half a second to import, and a stop signal in that time used to kill the process with
status 143 instead of the clean exit 0 every later moment gives. Everything else is
`services.cli.main`.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        from shared.early_signals import note_stop_signals, unblock_stop_signals

        note_stop_signals()
        unblock_stop_signals()
    from services.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
