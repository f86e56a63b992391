"""What trains and the two loop functions: layer groups, discriminative learning rates, one-cycle, epochs.

Only the pooled features and ``breed_head`` ever train: the backbone's ImageNet classifier stays frozen
because the scan uses it as the dog detector. ``train_one_epoch`` and ``eval_one_epoch`` run on any
iterable of (images, labels) batches, so tests drive them with plain tensors and no Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dogbreed.vision.nets import BreedNet, normalise
from dogbreed.vision.preprocessing import Preprocessing

WARMUP_FRACTION = 0.3  # share of a stage's steps spent raising the lr (one-cycle); early stopping waits it out


# ---- what trains -------------------------------------------------------------------------------------------


class BreedLogits(nn.Module):
    """The trained path of a BreedNet: breed logits from images, or from cached bottleneck features.

    Images arrive as uint8 NHWC model crops (what the scan feeds the network) and are normalised here.
    """

    def __init__(self, net: BreedNet, prep: Preprocessing | None = None, from_features: bool = False):
        super().__init__()
        self.net, self.prep, self.from_features = net, prep, from_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.from_features:
            return self.net.breed_head(x)
        if x.dtype == torch.uint8:
            x = normalise(x, self.prep)
        return self.net.breed_head(self.net.features(x))


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
    from dogbreed.breeds.taxonomy import imagenet_index_for

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
    if device.type == "cuda" and x.ndim == 4 and x.dtype != torch.uint8:
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
def eval_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], loss_fn: nn.Module,
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
