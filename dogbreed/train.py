"""The fine-tuning job (Ray Train): loop functions on plain iterables, the per-worker loop, and fit(cfg).

Only the pooled features and ``breed_head`` ever train: the backbone's ImageNet classifier stays frozen
because the scan uses it as the dog detector.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dogbreed import train_data, train_report
from dogbreed.config import ConfigError, dump_config
from dogbreed.models import BreedNet, ModelSpec, Preprocessing, create_backbone, read_artifact_spec, save_artifact
from dogbreed.train_config import TrainConfig

STATE_FILE = "state.pt"
WARMUP_FRACTION = 0.3  # share of a stage's steps spent raising the lr (one-cycle); early stopping waits it out
CONFIG_FILE = "train_config.yaml"
# Keys that may change between a killed run and its restart without invalidating its checkpoints.
_RESUME_FREE_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "torch_threads", "feature_actors", "max_failures",
                     "address", "progress"}


# ---- what trains -------------------------------------------------------------------------------------------


class BreedLogits(nn.Module):
    """The trained path of a BreedNet: breed logits from images, or from cached bottleneck features."""

    def __init__(self, net: BreedNet, from_features: bool = False):
        super().__init__()
        self.net, self.from_features = net, from_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.breed_head(x if self.from_features else self.net.features(x))


def layer_groups(backbone: nn.Module) -> list[list[nn.Parameter]]:
    """Backbone parameters in timm's coarse layer groups, bottom (stem) to top; the ImageNet classifier is left out."""
    from timm.models import group_parameters

    params = dict(backbone.named_parameters())
    classifier = {id(p) for p in backbone.get_classifier().parameters()}
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    ordered = [[params[n] for n in names if id(params[n]) not in classifier] for _, names in sorted(groups.items())]
    return [g for g in ordered if g]


def init_breed_head(net: BreedNet, class_folders: list[str]) -> int:
    """Warm start: copy the ImageNet classifier row of each breed that is an ImageNet class; returns how many.

    The head then starts at the zero-shot ImageNet answer instead of chance; other breeds keep random rows.
    """
    from dogbreed.labels import imagenet_index_for

    classifier = net.backbone.get_classifier()
    copied = 0
    with torch.no_grad():
        for row, folder in enumerate(class_folders):
            index = imagenet_index_for(folder)
            if index is not None:
                net.breed_head.weight[row].copy_(classifier.weight[index])
                net.breed_head.bias[row].copy_(classifier.bias[index])
                copied += 1
    return copied


def set_trainable(net: BreedNet, unfreeze_blocks: int) -> None:
    """Freeze the backbone except its top `unfreeze_blocks` layer groups; the breed head always trains."""
    net.backbone.requires_grad_(False)
    for group in layer_groups(net.backbone)[::-1][:unfreeze_blocks]:
        for p in group:
            p.requires_grad_(True)
    net.breed_head.requires_grad_(True)


def param_groups(net: BreedNet, unfreeze_blocks: int, lr: float, lr_decay: float) -> list[dict[str, Any]]:
    """Discriminative learning rates: the head gets lr, the k-th unfrozen group from the top lr * lr_decay**k."""
    groups = [{"params": list(net.breed_head.parameters()), "lr": lr, "name": "breed_head"}]
    for depth, params in enumerate(layer_groups(net.backbone)[::-1][:unfreeze_blocks], start=1):
        groups.append({"params": params, "lr": lr * lr_decay**depth, "name": f"backbone_top{depth}"})
    return groups


def make_optimizer(groups: list[dict[str, Any]], weight_decay: float, total_steps: int):
    """AdamW plus a one-cycle schedule (warm-up then cosine decay) peaking at each group's own lr."""
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(total_steps, 2), pct_start=WARMUP_FRACTION)
    return optimizer, scheduler


def set_train_mode(model: nn.Module) -> None:
    """train() for what learns; frozen BatchNorm layers stay in eval so their running statistics do not drift."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


# ---- the two loop functions ---------------------------------------------------------------------------------


@dataclass
class EpochStats:
    """Sums over one pass, so workers can add theirs before dividing."""

    loss_sum: float = 0.0
    correct: float = 0.0
    n: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.n, 1.0)

    @property
    def acc(self) -> float:
        return self.correct / max(self.n, 1.0)

    def all_reduce(self) -> "EpochStats":
        """Sum across DDP workers (no-op for one process)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self
        t = torch.tensor([self.loss_sum, self.correct, self.n], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            t = t.cuda()
        torch.distributed.all_reduce(t)
        return EpochStats(*t.cpu().tolist())


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler=None, device: torch.device | str = "cpu") -> EpochStats:
    """One pass of optimisation; steps the scheduler per batch. bf16 autocast on CUDA only."""
    device = torch.device(device)
    set_train_mode(model)
    stats = EpochStats()
    for x, y in batches:
        x, y = _to_device(x, y, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x)
            loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None and scheduler.last_epoch + 1 < getattr(scheduler, "total_steps", math.inf):
            scheduler.step()
        stats.loss_sum += float(loss.detach()) * len(y)
        stats.correct += float((logits.argmax(1) == y).sum())
        stats.n += len(y)
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
             device: torch.device | str = "cpu") -> EpochStats:
    """Loss and top-1 over a pass without gradients or augmentation."""
    device = torch.device(device)
    model.eval()
    stats = EpochStats()
    for x, y in batches:
        x, y = _to_device(x, y, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x).float()
        stats.loss_sum += float(loss_fn(logits, y)) * len(y)
        stats.correct += float((logits.argmax(1) == y).sum())
        stats.n += len(y)
    return stats


# ---- the per-worker loop ------------------------------------------------------------------------------------


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
    for b in shard.iter_torch_batches(batch_size=batch_size, dtypes={"x": torch.float32, "label": torch.int64}):
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
               steps_per_epoch: int) -> dict:
    """Epochs of one stage from where `state` left off; returns the best weights so far."""
    import ray.train.torch

    if state.stage_done:
        return best
    device = ray.train.torch.get_device()
    set_trainable(net, stage.unfreeze)
    model = ray.train.torch.prepare_model(BreedLogits(net, stage.from_features))
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
        va = evaluate(model, _shard_batches("val" + suffix, cfg.batch_size), nn.CrossEntropyLoss(), device).all_reduce()
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
        best = _run_stage(net, stage, state, saved, best, cfg, config["steps_per_epoch"])


# ---- the driver ---------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What fit hands back: where the artifact is, its id, and its headline metrics."""

    artifact_dir: Path
    model_id: str
    metrics: dict[str, Any]


def _init_ray(address: str | None, progress: bool = False) -> None:
    """Join the given cluster (or RAY_ADDRESS), else start a private local Ray: never another user's `ray start`."""
    import ray
    import ray.data

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, **({"include_dashboard": False} if address == "local" else {}))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = progress


def _check_resume(cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a run whose checkpoints came from a different training setup."""
    import yaml

    saved_path = out / CONFIG_FILE
    if saved_path.is_file() and (out / cfg.run_name).is_dir():
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        now = cfg.model_dump(mode="json")
        changed = sorted(k for k in now if k not in _RESUME_FREE_KEYS and saved.get(k) != now[k])
        if changed:
            raise ConfigError(f"{out / cfg.run_name} holds checkpoints of a run with different {', '.join(changed)}; "
                              "use another out folder or run_name")
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(dump_config(cfg), encoding="utf-8")


def _datasets(cfg: TrainConfig, splits: train_data.Splits, prep: Preprocessing) -> dict[str, Any]:
    ds = {"train": train_data.image_dataset(splits.train, prep, train=True),
          "val": train_data.image_dataset(splits.val, prep, train=False)}
    if any(s.from_features for s in stages(cfg)):
        model = {"backbone": cfg.backbone, "weights": cfg.weights, "pretrained": cfg.pretrained}
        for name, items in (("train", splits.train), ("val", splits.val)):
            ds[f"{name}_features"] = train_data.feature_dataset(items, prep, model, cfg.feature_actors, cfg.use_gpu)
    return ds


def _run_trainer(cfg: TrainConfig, out: Path, splits: train_data.Splits, prep: Preprocessing):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    steps = math.ceil(len(splits.train) / (cfg.num_workers * cfg.batch_size))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "class_folders": splits.class_folders,
                           "steps_per_epoch": steps},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        # Same storage_path + name = Ray Train restores the latest checkpoint of a killed run.
        run_config=RunConfig(name=cfg.run_name, storage_path=str(out),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=_datasets(cfg, splits, prep),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {out / cfg.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def _preprocessing(backbone: nn.Module, input_size: int | None) -> Preprocessing:
    prep = Preprocessing.from_timm(backbone)
    return replace(prep, input_size=input_size) if input_size else prep


def fit(cfg: TrainConfig) -> TrainResult:
    """Train per cfg with Ray Train, export the best epoch as a model artifact in cfg.out, test it, write results."""
    if cfg.data is None or cfg.out is None:
        raise ConfigError("training needs both 'data' and 'out'")
    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    _check_resume(cfg, out)
    splits = train_data.make_splits(cfg.data, cfg.val_data, cfg.test_data, cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.weights, cfg.pretrained)
    prep = _preprocessing(backbone, cfg.input_size)
    _init_ray(cfg.address, cfg.progress)
    saved = _run_trainer(cfg, out, splits, prep)
    net = BreedNet(backbone, len(splits.class_folders))
    net.load_state_dict(saved["best_model"])
    history = saved["run"]["history"]
    train_report.write_history(history, out)
    best = min(history, key=lambda h: h["val_loss"]) if cfg.select == "best" else history[-1]
    training = {"mode": cfg.mode, "epochs": len(history), "best_epoch": best["epoch"], "select": cfg.select,
                "data": cfg.data,
                "val_data": cfg.val_data, "test_data": cfg.test_data, "data_fingerprint": splits.fingerprint,
                "split_sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
                "unfreeze_blocks": cfg.unfreeze_blocks if cfg.mode != "freeze" else 0, "lr": cfg.lr,
                "lr_decay": cfg.lr_decay, "head_init": cfg.head_init,
                "finetune_lr": cfg.finetune_lr, "label_smoothing": cfg.label_smoothing, "seed": cfg.seed,
                "resumed_at_epochs": saved["run"]["resumed_at"]}
    spec = ModelSpec(backbone=cfg.backbone, class_names=splits.class_names, breed_source="head",
                     preprocessing=prep, metrics={"val_loss": best["val_loss"], "val_top1": best["val_acc"]},
                     training=training)
    save_artifact(net, spec, out)
    test = evaluate_artifact(out, splits.test, splits.class_folders, out / "test", cfg.feature_actors, cfg.use_gpu)
    spec.metrics |= {"test_top1": test["top1"], "test_top5": test["top5"], "test_n": test["n"]}
    spec.training["wall_seconds"] = round(time.perf_counter() - t0, 1)
    model_id = save_artifact(net, spec, out)  # same weights and identity: same model_id, metrics added
    return TrainResult(out, model_id, spec.metrics | {"wall_seconds": spec.training["wall_seconds"]})


def evaluate_artifact(model_dir: str | Path, items: list[train_data.Item] | str, class_folders: list[str] | None = None,
                      out_dir: str | Path | None = None, actors: int = 1, use_gpu: bool = False,
                      address: str | None = None) -> dict[str, Any]:
    """Top-1/top-5, per-breed accuracy and confusion of an artifact on labelled photos (a class-folder path or items)."""
    _init_ray(address)
    spec, _ = read_artifact_spec(model_dir)
    if isinstance(items, (str, Path)):
        folders = class_folders or _folders_for(spec.class_names, items)
        items = train_data.label_items(train_data.list_class_folders(items), folders, Path(items))
    labels_, logits = train_data.predict_items(items, spec.preprocessing, str(model_dir), actors, use_gpu)
    result = train_report.classification_metrics(labels_, logits, spec.class_names)
    if out_dir is not None:
        train_report.write_test_report(result, spec.class_names, out_dir)
    return result


def _folders_for(class_names: list[str], root: str | Path) -> list[str]:
    """Map a folder set onto the artifact's class order by readable breed name."""
    from dogbreed.labels import breed_from_folder, canonical

    by_name = {canonical(breed_from_folder(f)): f for f in train_data.list_class_folders(root)}
    unknown = sorted(set(by_name) - {canonical(n) for n in class_names})
    if unknown:
        raise train_data.DataError(f"{root} has class folders the model does not know: {', '.join(unknown[:5])}")
    return [by_name.get(canonical(n), f"<absent {n}>") for n in class_names]
