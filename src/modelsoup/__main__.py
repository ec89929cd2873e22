"""``python -m modelsoup``: the ``modelsoup`` command (``python -m modelsoup average ...``).

Example:
    >>> import subprocess, sys
    >>> done = subprocess.run([sys.executable, "-m", "modelsoup", "--version"],
    ...                       capture_output=True, text=True)
    >>> done.returncode, done.stdout.startswith("modelsoup")
    (0, True)
"""

import modelsoup_launch

if __name__ == "__main__":
    modelsoup_launch.main()
