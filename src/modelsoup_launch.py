"""The ``modelsoup`` console script's first step, outside the package on purpose.

Importing :mod:`modelsoup` imports torch, which takes seconds; a Ctrl-C then must end
in one ``error:`` line like every other stop, not a traceback. This module imports
nothing heavy, so the interrupt can be caught around the package's import too.
"""

import sys


def main() -> None:
    """Import the CLI and run it; Ctrl-C at any point ends with one line and exit 130."""
    try:
        from modelsoup.cli import main as run

        code = run()
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing half-written was left behind\n")
        code = 130
    sys.exit(code)
