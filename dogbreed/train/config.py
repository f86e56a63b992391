"""Typed configuration of the fine-tuning job (configs/train.yaml documents every key and equals the defaults)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dogbreed.config import PHOTO_EXTENSIONS, ConfigError, LocalPath, PhotoConfig, _Strict, load_config
from dogbreed.vision.spec import DEFAULT_BACKBONE

__all__ = ["TrainConfig", "load_train_config", "ConfigError"]


class TrainDecodeConfig(_Strict):
    """The Ray Data tasks that decode (and augment) training photos."""

    batch_size: int = Field(8, ge=1, description="photos per decode task call")
    num_cpus: float = Field(0.75, gt=0, description="CPUs reserved per decode task")
    max_retries: int = Field(2, ge=0, description="retries of a decode task whose worker died; never unbounded")


class TrainConfig(_Strict):
    """What to train on, how, and with which resources."""

    data: LocalPath | None = Field(None, description="labelled photo folder: class folders, Stanford Images/, or train/valid/test")
    val_data: LocalPath | None = Field(None, description="separate class-folder set for model selection; null = split from data")
    test_data: LocalPath | None = Field(None, description="separate class-folder set for the final test; null = split from data")
    out: LocalPath | None = Field(None, description="artifact folder; checkpoints and results live beside the weights")
    run_name: str = Field("run", description="Ray Train run name under out/; same out + name resumes a killed run")
    backbone: str = Field(DEFAULT_BACKBONE, description="timm model name; must keep its ImageNet-1k head")
    weights: LocalPath | None = Field(None, description="local weights file; null = offline default (or random for other backbones)")
    pretrained: bool = Field(False, description="download timm hub weights (needs network)")
    input_size: int | None = Field(None, ge=32, description="square input side; null = the model's own")
    head_init: Literal["imagenet", "random"] = Field("imagenet", description="start breed rows from the ImageNet classifier")
    classes: LocalPath | None = Field(None, description="taxonomy file (one class a line: dog-app, plain or Stanford names; "
                                "'dogapp133' = the dog app's 133); null = one class per folder of data")
    missing_classes: Literal["refuse", "drop"] = Field("refuse", description="a class with neither photos nor an "
                                                       "ImageNet class: refuse the run, or drop it with a warning")
    mode: Literal["freeze", "finetune", "two-stage", "fewshot"] = Field("freeze", description="what trains; see train.yaml")
    fewshot_views: int = Field(8, ge=0, description="fewshot: extra views per photo (its mirror, then augmented crops)")
    fewshot_kappa: float = Field(4.0, ge=0, description="fewshot: how many photos' worth an ImageNet row counts for in "
                                 "its breed's prototype")
    epochs: int = Field(10, ge=1, description="epochs of the main stage (the unfrozen stage in two-stage)")
    head_epochs: int = Field(3, ge=1, description="two-stage only: head-only epochs before unfreezing")
    unfreeze_blocks: int = Field(2, ge=0, description="top layer groups of the backbone that train in finetune/two-stage")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of the breed head")
    finetune_lr: float | None = Field(None, gt=0, description="two-stage: peak head lr once unfrozen; null = lr")
    lr_decay: float = Field(0.3, gt=0, le=1.0, description="each lower layer group gets lr x lr_decay^depth")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="cross-entropy label smoothing")
    batch_size: int = Field(32, ge=1, description="images per step per worker")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (one GPU each when use_gpu)")
    use_gpu: bool = Field(False, description="one GPU per worker; bf16 autocast + channels_last")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per train worker; the rest decode photos")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per worker on CPU; null = cpus_per_worker")
    feature_actors: int = Field(1, ge=1, description="Ray Data actors that compute bottleneck features")
    patience: int | None = Field(3, ge=1, description="early stopping: epochs without val-loss improvement; null = never")
    select: Literal["best", "last"] = Field("best", description="artifact weights: lowest val loss, or the schedule's end")
    cache_features: bool = Field(True, description="head-only epochs train on bottleneck features computed once")
    seed: int = Field(0, description="split, init and shuffle seed")
    extensions: list[str] = Field(default_factory=lambda: list(PHOTO_EXTENSIONS),
                                  description="files that count as photos in the labelled folders")
    photos: PhotoConfig = Field(default_factory=PhotoConfig, description="how photos are opened: the scan's guards "
                                "and decode size (keep them equal to the scan's, so training's crops are its crops)")
    decode: TrainDecodeConfig = Field(default_factory=TrainDecodeConfig, description="the Ray Data decode tasks")
    max_failures: int = Field(2, ge=0, le=10, description="worker-failure restarts from the last checkpoint; bounded "
                              "(0-10), since nothing retries without bound")
    progress: bool = Field(False, description="show Ray Data progress bars")
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS or a local Ray started here")

    @model_validator(mode="after")
    def _unfreeze_needs_blocks(self) -> "TrainConfig":
        if self.mode in ("finetune", "two-stage") and self.unfreeze_blocks == 0:
            raise ValueError(f"mode {self.mode!r} needs unfreeze_blocks >= 1 (use mode 'freeze' for a head only)")
        return self

    @property
    def total_epochs(self) -> int:
        """Epochs across stages: two-stage runs head_epochs first."""
        return self.epochs + (self.head_epochs if self.mode == "two-stage" else 0)


def load_train_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """TrainConfig from YAML plus overrides; data and out must be set by one of them."""
    cfg = load_config(TrainConfig, path, overrides)
    for key in ("data", "out"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"{path or 'command-line options'}: key '{key}' must be set")
    return cfg
