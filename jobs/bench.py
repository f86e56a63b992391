"""Speed benchmark: `python jobs/bench.py [--photos 60] [--classic 8] [--workdir DIR]` (same as `dogbreed bench`).

Classic dog-app loop vs. the scan end to end vs. the stage bounds, on the same generated 12-MP and small photos.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without pip install

from dogbreed.bench import format_report, run_benchmark  # noqa: E402
from dogbreed.config import ScanConfig, load_config  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=60, help="N: scans run on N and 3N photos")
    ap.add_argument("--classic", type=int, default=8, help="photos for the (slow) classic loop")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dogbreed-bench"), help="generated photos are kept here")
    ap.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "scan.yaml")
    args = ap.parse_args()
    cfg = load_config(ScanConfig, args.config)
    print(format_report(run_benchmark(args.workdir, cfg, n=args.photos, classic_n=args.classic)))
