"""The Ray Train per-worker loop: stages (freeze, fine-tune, two-stage), checkpoints, resume, early stopping."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dogbreed.train.config import TrainConfig
from dogbreed.train.loop import (
    WARMUP_FRACTION,
    BreedLogits,
    eval_one_epoch,
    init_breed_head,
    make_optimizer,
    param_groups,
    set_trainable,
    train_one_epoch,
)
from dogbreed.vision.nets import BreedNet, create_backbone
from dogbreed.vision.preprocessing import Preprocessing

STATE_FILE = "state.pt"


@dataclass
class Stage:
    """A run of epochs with one trainable set: a head stage (unfreeze 0) or an unfrozen stage."""

    name: str
    epochs: int
    unfreeze: int
    from_features: bool
    lr: float  # peak lr of the breed head; lower groups get lr * lr_decay**depth


def stages(cfg: TrainConfig) -> list[Stage]:
    """freeze: head only; finetune: top blocks from the start; two-stage: head, then top blocks."""
    head = Stage("head", cfg.head_epochs if cfg.mode == "two-stage" else cfg.epochs, 0, cfg.cache_features, cfg.lr)
    tuned_lr = cfg.finetune_lr if cfg.mode == "two-stage" and cfg.finetune_lr else cfg.lr
    tuned = Stage("finetune", cfg.epochs, cfg.unfreeze_blocks, False, tuned_lr)
    return {"freeze": [head], "finetune": [tuned], "two-stage": [head, tuned]}[cfg.mode]


@dataclass
class RunState:
    """Progress saved in every checkpoint (beside model, optimizer and scheduler state)."""

    epoch: int = 0  # epochs completed over all stages
    stage: int = 0
    stage_epoch: int = 0
    stage_done: bool = False
    best_val_loss: float = math.inf
    best_epoch: int = -1
    stale: int = 0
    resumed_at: list[int] = field(default_factory=list)  # completed epochs whenever a checkpoint was restored
    history: list[dict[str, float]] = field(default_factory=list)


def _shard_batches(name: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    import ray.train

    shard = ray.train.get_dataset_shard(name)
    for b in shard.iter_torch_batches(batch_size=batch_size):  # x: uint8 crops or float32 features, label: int64
        yield b["x"], b["label"]


def _restore(net: BreedNet) -> tuple[RunState, dict[str, Any] | None]:
    """State of the last reported checkpoint, if this run (or a killed run of the same name) has one."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RunState(), None
    with ckpt.as_directory() as d:
        saved = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    net.load_state_dict(saved["model"])
    state = RunState(**saved["run"])
    state.resumed_at.append(state.epoch)
    return state, saved


def _report(state: RunState, net: BreedNet, best: dict, optimizer, scheduler, metrics: dict[str, float]) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (tensors and plain values only: weights_only loads it)."""
    import ray.train

    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"run": asdict(state), "model": net.state_dict(), "best_model": best,
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(tmp) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _cpu_state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def _run_stage(net: BreedNet, stage: Stage, state: RunState, saved: dict | None, best: dict, cfg: TrainConfig,
               steps_per_epoch: int, prep: Preprocessing) -> dict:
    """Epochs of one stage from where `state` left off; returns the best weights so far."""
    import ray.train.torch

    if state.stage_done:
        return best
    device = ray.train.torch.get_device()
    set_trainable(net, stage.unfreeze)
    model = ray.train.torch.prepare_model(BreedLogits(net, prep, stage.from_features))
    optimizer, scheduler = make_optimizer(param_groups(net, stage.unfreeze, stage.lr, cfg.lr_decay),
                                          cfg.weight_decay, stage.epochs * steps_per_epoch)
    if saved is not None and state.stage_epoch > 0:
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    suffix = "_features" if stage.from_features else ""
    train_loss = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    while state.stage_epoch < stage.epochs and not state.stage_done:
        t0 = time.perf_counter()
        tr = train_one_epoch(model, _shard_batches("train" + suffix, cfg.batch_size), train_loss, optimizer,
                             scheduler, device).all_reduce()
        va = eval_one_epoch(model, _shard_batches("val" + suffix, cfg.batch_size), nn.CrossEntropyLoss(), device).all_reduce()
        state.epoch, state.stage_epoch = state.epoch + 1, state.stage_epoch + 1
        if va.loss < state.best_val_loss:
            state.best_val_loss, state.best_epoch, state.stale, best = va.loss, state.epoch, 0, _cpu_state(net)
        elif state.stage_epoch > math.ceil(WARMUP_FRACTION * stage.epochs):  # a rising lr may lift val loss
            state.stale += 1
        if cfg.select == "last":  # the annealed end of the one-cycle schedule, not the lowest val loss
            state.best_epoch, best = state.epoch, _cpu_state(net)
        stopped = cfg.patience is not None and state.stale >= cfg.patience
        state.stage_done = stopped or state.stage_epoch >= stage.epochs
        metrics = {"epoch": state.epoch, "stage": stage.name, "train_loss": tr.loss, "train_acc": tr.acc,
                   "val_loss": va.loss, "val_acc": va.acc, "lr": optimizer.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
        state.history.append(metrics)
        _report(state, net, best, optimizer, scheduler, metrics)
    return best


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry: build the net, restore the last checkpoint, run the remaining stages."""
    import ray.train.torch

    cfg = TrainConfig.model_validate(config["cfg"])
    torch.manual_seed(cfg.seed)
    if not cfg.use_gpu:
        torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    net = BreedNet(create_backbone(cfg.backbone, cfg.weights, cfg.pretrained), len(config["class_folders"]))
    if cfg.head_init == "imagenet":
        init_breed_head(net, config["class_folders"])
    net.to(ray.train.torch.get_device())
    if cfg.use_gpu:
        net.to(memory_format=torch.channels_last)
    state, saved = _restore(net)
    best = saved["best_model"] if saved else _cpu_state(net)
    for index, stage in enumerate(stages(cfg)):
        if index < state.stage:
            continue
        if index > state.stage:  # a new stage starts from the best weights of the previous one
            net.load_state_dict(best)
            state.stage, state.stage_epoch, state.stage_done, state.stale, saved = index, 0, False, 0, None
        best = _run_stage(net, stage, state, saved, best, cfg, config["steps_per_epoch"],
                          Preprocessing(**config["preprocessing"]))
