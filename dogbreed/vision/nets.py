"""The networks: a timm backbone that keeps its ImageNet head (the dog detector) plus a breed head (linear, or
few-shot prototypes), how weights are read (never unpickled), and the identity of the features they compute.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from dogbreed.vision.preprocessing import Preprocessing
from dogbreed.vision.spec import DEFAULT_BACKBONE, IMAGENET_CLASSES, ModelError, default_weights_path  # noqa: F401 - also found here


def normalise(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 NHWC photos (as images.model_crop makes them) -> the float NCHW input the weights expect.

    Photos travel as uint8 (4x fewer bytes than float) and are normalised here, on the model's device,
    the same way in the scan, in evaluation and in training.
    """
    mean = torch.tensor(prep.mean, device=images.device).view(1, 3, 1, 1) * 255.0
    std = torch.tensor(prep.std, device=images.device).view(1, 3, 1, 1) * 255.0
    x = images.permute(0, 3, 1, 2).float().sub_(mean).div_(std)
    return x.contiguous(memory_format=torch.channels_last)


class PrototypeHead(nn.Module):
    """Breed scores from calibrated cosine prototypes, plus the ImageNet head's answer for breeds ImageNet has.

    score_c(f) = a * log_softmax(imagenet logits)[imagenet_index_c]   (only where imagenet_index_c >= 0)
                 + normalise(f - mu) . rows_c + bias_c
    rows_c is the breed's unit prototype (for a breed without photos, its ImageNet row's direction) times a
    calibrated scale; dogbreed.train.fewshot fits them.
    """

    def __init__(self, num_features: int, num_breeds: int):
        super().__init__()
        self.register_buffer("mu", torch.zeros(num_features))
        self.register_buffer("rows", torch.zeros(num_breeds, num_features))
        self.register_buffer("bias", torch.zeros(num_breeds))
        self.register_buffer("imagenet_index", torch.full((num_breeds,), -1, dtype=torch.long))
        self.register_buffer("imagenet_weight", torch.ones(()))  # a

    def forward(self, feats: torch.Tensor, imagenet_logits: torch.Tensor) -> torch.Tensor:
        z = nn.functional.normalize(feats.float() - self.mu, dim=1)
        scores = z @ self.rows.T + self.bias
        known = self.imagenet_index >= 0
        logp = torch.log_softmax(imagenet_logits.float(), dim=1)[:, self.imagenet_index.clamp_min(0)]
        return scores + self.imagenet_weight * logp * known


class BreedNet(nn.Module):
    """A timm backbone that keeps its ImageNet head (the dog detector) plus an optional breed head.

    One backbone pass yields both: ImageNet logits for the dog score, breed logits for the name.
    """

    def __init__(self, backbone: nn.Module, num_breeds: int | None = None, head: str = "linear"):
        super().__init__()
        self.backbone = backbone
        self.head_kind = head
        if not num_breeds:
            self.breed_head = None
        elif head == "prototypes":
            self.breed_head = PrototypeHead(backbone.num_features, num_breeds)
        else:
            self.breed_head = nn.Linear(backbone.num_features, num_breeds)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features ("bottleneck features")."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        imagenet = self.backbone.get_classifier()(feats)
        if self.breed_head is None:
            return imagenet, None
        breed = self.breed_head(feats, imagenet) if self.head_kind == "prototypes" else self.breed_head(feats)
        return imagenet, breed

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.heads(self.features(x))


class Outputs(nn.Module):
    """What one pass gives the scan, from uint8 NHWC photos: (ImageNet probabilities, breed probabilities, pooled
    features). Eager torch runs this module; the CPU runtime (dogbreed.vision.runtime) converts this very module, so
    both compute the same thing from the same weights.

    Breeds are the renormalised ImageNet dog classes (`breed_indices`, the default and zero-shot models) or the
    softmax of the breed head (a trained model).
    """

    def __init__(self, net: BreedNet, prep: Preprocessing, breed_indices: list[int] | None = None):
        super().__init__()
        self.net, self.prep = net, prep
        self.from_imagenet = net.breed_head is None
        if self.from_imagenet and not breed_indices:
            raise ValueError("a network without a breed head needs the ImageNet classes that are breeds")
        self.register_buffer("breed_indices", torch.tensor(breed_indices or [], dtype=torch.long))

    def probabilities(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(ImageNet probabilities, breed probabilities) of pooled features: the heads alone."""
        imagenet_logits, breed_logits = self.net.heads(feats)
        imagenet = imagenet_logits.float().softmax(-1)
        if self.from_imagenet:
            breeds = imagenet[:, self.breed_indices]
            return imagenet, breeds / breeds.sum(-1, keepdim=True).clamp_min(1e-12)
        return imagenet, breed_logits.float().softmax(-1)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feats = self.net.features(normalise(images, self.prep))
        imagenet, breeds = self.probabilities(feats)
        return imagenet, breeds, feats


# Floating-point weights may be stored as F16 or BF16 (a checkpoint saved after .half(), as many published ones are):
# widening them to the network's float32 is exact, so the model computes what its author's did. F64 narrows.
FLOAT_WEIGHTS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def weights_problem(name: str, stored: torch.Tensor, held: torch.Tensor) -> str | None:
    """Why a stored tensor cannot become the network's tensor `held` (its dtype is what counts), or None. Loading
    converts silently: int8 weights became whole numbers, and NaN or infinity made every photo's answer empty."""
    if held.dtype.is_floating_point:
        if stored.dtype not in FLOAT_WEIGHTS:
            return f"{name} is stored as {str(stored.dtype).removeprefix('torch.')}, where the network needs " \
                   "float16, bfloat16, float32 or float64 weights"
        if not torch.isfinite(stored.to(held.dtype)).all():  # after the cast: a float64 past float32's range is inf
            return f"{name} holds NaN or infinite values"
    elif stored.dtype.is_floating_point or stored.dtype.is_complex or stored.dtype == torch.bool:
        return f"{name} is stored as {str(stored.dtype).removeprefix('torch.')}, where the network needs integers"
    elif name.endswith("imagenet_index") and stored.numel() and not -1 <= stored.min() <= stored.max() < IMAGENET_CLASSES:
        bad = stored.max() if stored.max() >= IMAGENET_CLASSES else stored.min()  # was a traceback in every worker
        return f"{name} holds {int(bad)}: a breed's ImageNet class is 0-{IMAGENET_CLASSES - 1}, or -1 for none"
    return None


def check_state(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], weights: str) -> None:
    """Every stored tensor that the network holds (by name) must be of a usable dtype and finite: else one sentence,
    '`weights` cannot be used (why)'."""
    for name, stored in state.items():
        if name in own and (problem := weights_problem(name, stored, own[name])):
            raise ModelError(f"{weights} cannot be used ({problem})")


def _load_state_in_order(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load weights whose names differ from timm's but whose order and shapes match (e.g. lukemelas-style files)."""
    own = module.state_dict()
    if len(own) != len(state) or any(a.shape != b.shape for a, b in zip(own.values(), state.values())):
        raise ModelError(f"weights in {source} do not fit {type(module).__name__}: tensor count or shapes differ")
    renamed = dict(zip(own.keys(), state.values()))
    check_state(renamed, own, f"the weights in {source}")
    module.load_state_dict(renamed, strict=True)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is a bad weights file
        raise ModelError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path} holds no state dict")
    return state


def create_backbone(name: str = DEFAULT_BACKBONE, weights: str | Path | None = None, pretrained: bool = False) -> nn.Module:
    """A timm ImageNet classifier by name: weights from a local file, timm's hub (pretrained=True), or the offline default."""
    import timm

    try:
        net = timm.create_model(name, pretrained=pretrained and weights is None)
    except RuntimeError as e:
        raise ModelError(f"unknown backbone {name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - hub unreachable and similar
        raise ModelError(f"cannot create backbone {name!r} with pretrained weights ({str(e).splitlines()[0]}); "
                         "pass a local weights file instead") from None
    if weights is None and not pretrained and name == DEFAULT_BACKBONE:
        weights = default_weights_path()
    if weights is not None:
        state = read_weights(weights)
        check_state(state, net.state_dict(), f"the weights in {weights}")
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError:
            _load_state_in_order(net, state, str(weights))
    if net.num_classes != 1000:
        raise ModelError(f"backbone {name!r} must keep its ImageNet-1k head for dog detection")
    return net.eval()


def embedding_id(net: BreedNet, backbone: str) -> str:
    """The identity of the pooled features a network computes: its backbone name and a hash of every weight that
    feeds them (the ImageNet classifier and the breed head excluded). A freeze-mode artifact shares it with the
    model it was trained from; a fine-tuned one, or another backbone, does not, so their vectors never mix."""
    classifier = {id(p) for p in net.backbone.get_classifier().parameters()}
    h = hashlib.sha256()
    for name, tensor in net.backbone.state_dict(keep_vars=True).items():
        if id(tensor) in classifier:
            continue
        t = tensor.detach().to("cpu").contiguous()
        h.update(name.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return f"{backbone}@{h.hexdigest()[:16]}"
