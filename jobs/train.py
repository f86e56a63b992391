"""Entry point for `ray job submit --working-dir . -- python jobs/train.py --config configs/train.yaml DATA --out DIR`.

The same code path as `dogbreed train`: it is that command, run inside the cluster's job driver.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir, when not pip-installed

from dogbreed.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["train", *sys.argv[1:]])
