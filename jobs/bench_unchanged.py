"""Benchmark: the nightly re-run over an unchanged archive of 100,000 photos opens no image and takes seconds.

    python jobs/bench_unchanged.py [--files 100000] [--workdir DIR]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without pip install

from dogbreed.bench_unchanged import run_unchanged_benchmark  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=None, help="kept afterwards if given")
    args = ap.parse_args()
    run_unchanged_benchmark(args.files, args.workdir)
