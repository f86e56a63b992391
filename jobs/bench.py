"""Speed benchmark: `python jobs/bench.py [--photos 60] [--classic 8] [--workdir DIR]`, the same as `dogbreed bench`.

Classic dog-app loop vs. the scan end to end vs. the stage bounds, on the same generated 12-MP and small photos.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without pip install

from dogbreed.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]])
