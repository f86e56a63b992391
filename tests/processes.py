"""Running the installed `dogbreed` console script in a child process, as cron and operators do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

DOGBREED = Path(sys.executable).with_name("dogbreed")


def cli(*args: str, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    """Run `dogbreed ARGS` to completion in a child process (text output captured)."""
    return subprocess.run([str(DOGBREED), *args], capture_output=True, text=True, timeout=timeout, **kwargs)
