"""Suite-wide set-up, for doctests in src/ as much as for tests/: the sha256 cache
(modelsoup.formats.hashcache) goes to a temporary file, never to the user's ~/.cache."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ["MODELSOUP_HASH_CACHE"] = str(Path(tempfile.mkdtemp()) / "sha256.jsonl")
