"""The fine-tuning job (Ray Train): config, data, the loop functions, the per-worker loop, the driver, reports.

``fit(cfg)`` is the one entry; `dogbreed train` and jobs/train.py call it through the typer app.
"""

from dogbreed.train.config import TrainConfig, load_train_config
from dogbreed.train.driver import TrainResult, fit

__all__ = ["TrainConfig", "TrainResult", "fit", "load_train_config"]
