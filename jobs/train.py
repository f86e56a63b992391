"""Fine-tune a breed classifier (Ray Train) and write a model artifact.

ray job submit -- python jobs/train.py --config configs/train.yaml --set data=DIR --set out=DIR
"""

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the shipped working dir, when not pip-installed

from dogbreed.train import fit  # noqa: E402
from dogbreed.train_config import ConfigError, load_train_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/train.yaml", help="YAML file of TrainConfig keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key (YAML value)")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, _, v in (s.partition("=") for s in args.set)}
    try:
        cfg = load_train_config(args.config, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    result = fit(cfg)
    print(f"model {result.model_id} written to {result.artifact_dir}: {result.metrics}")


if __name__ == "__main__":
    main()
