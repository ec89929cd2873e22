"""The ``modelsoup`` console script's first step, outside the package on purpose.

Importing :mod:`modelsoup` imports torch, which takes seconds; a Ctrl-C then must end
in one ``error:`` line like every other stop, not a traceback. This module imports
nothing heavy, so the interrupt can be caught around the package's import too.

A Ctrl-C can also land outside any ``try`` (after this module is imported and before
:func:`main` starts, or while it exits): from import on, SIGINT is handled here. While
the package is imported, and outside :func:`main`, nothing has been written yet, and the
process ends at once with that line: a ``KeyboardInterrupt`` raised inside torch's
import can be swallowed by its C code (which then carries on, or fails on a
half-imported numpy). Once the CLI runs it is the usual ``KeyboardInterrupt``, so every
``finally`` (removing half-written files) runs.
"""

import os
import signal
import sys

_MESSAGE = "error: interrupted; nothing half-written was left behind\n"
_inside_main = False


def _on_sigint(signum, frame):  # noqa: ARG001 - the signal handler's signature
    if _inside_main:
        raise KeyboardInterrupt
    sys.stderr.write(_MESSAGE)
    sys.stderr.flush()
    os._exit(130)


try:
    signal.signal(signal.SIGINT, _on_sigint)
except ValueError:  # not the main thread: leave signals as they are
    pass


def main() -> None:
    """Import the CLI and run it; Ctrl-C at any point ends with one line and exit 130."""
    global _inside_main
    from modelsoup.cli import main as run  # a Ctrl-C here ends the process at once

    try:
        _inside_main = True
        code = run()
    except KeyboardInterrupt:
        _inside_main = False
        sys.stderr.write(_MESSAGE)
        code = 130
    finally:
        _inside_main = False
    sys.exit(code)
