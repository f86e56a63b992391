"""The network on a CPU inference runtime: OpenVINO, converted from the very same torch module.

On CPU the backbone runs about 2.3x faster in OpenVINO than in eager PyTorch (EfficientNet-Lite0, one thread,
batch 16: 12 vs 29 ms per image), with the same outputs: OpenVINO is told to compute in fp32 (its default on CPUs with
bf16 support is bf16, which moves dog scores by up to 0.03 and flips 2.5% of ImageNet top-1s). What is converted is
:class:`dogbreed.vision.nets.Outputs` whole: uint8 photos in; ImageNet probabilities, breed probabilities and the
pooled features out.

The converted network is cached as OpenVINO IR (XML + weights, not a pickle) beside a ``meta.json`` (the model's
description, model_id and embedding_id) under ``cache_home()/openvino``, keyed by the model id (which hashes the
weights and the description) and the OpenVINO version. Only the first process that ever runs a model pays for the
conversion (about 6 s); later ones load it in a fraction of a second, and a scan's CPU actors (which know the model
id from the driver) load it without importing torch or timm at all (about 4 s of CPU less per actor). GPUs keep torch.
Each load marks the entry used; writing a new entry removes those nobody loaded for UNUSED_DAYS (:func:`prune`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from dogbreed.config import cache_home
from dogbreed.vision.spec import ModelSpec

log = logging.getLogger("dogbreed.vision.runtime")
RUNTIMES = ("auto", "torch", "openvino")
NETWORK, META = "network.xml", "meta.json"
LAYOUT = "u8"  # what a cache entry holds (uint8 photos in, three outputs); part of its key
# A cache entry nobody loaded for this long (another OpenVINO version's, an older layout's, a model no longer scanned)
# is removed when a new one is written, so years of models and upgrades do not pile up (about 20 MB each).
UNUSED_DAYS = 30
STALE_TMP_S = 3600  # a temporary folder this old is a conversion that was killed
_TMP_NAME = re.compile(r"\..+\.[0-9a-f]{32}")  # what _save names its temporary folders


@dataclass
class Compiled:
    """A model converted for OpenVINO and compiled for this CPU, with what the rows need to say which model it is."""

    spec: ModelSpec
    model_id: str
    embedding_id: str
    request: Any  # an OpenVINO infer request, reused batch after batch

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 NHWC photos -> (ImageNet probabilities, breed probabilities, pooled features), float32."""
        self.request.infer({0: np.ascontiguousarray(images, dtype=np.uint8)})
        return tuple(self.request.get_output_tensor(i).data.copy() for i in range(3))  # type: ignore[return-value]


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(runtime: str, device_type: str) -> str:
    """What runs the backbone: openvino on CPU where it is installed (auto), torch on a GPU or when asked for."""
    if runtime not in RUNTIMES:
        raise ValueError(f"inference runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if device_type != "cpu" or runtime == "torch":
        return "torch"
    if runtime == "openvino" and not available():
        raise ValueError("inference.runtime: openvino is not installed (pip install openvino)")
    return "openvino" if available() else "torch"


def _cache_dir(spec: ModelSpec, model_id: str) -> Any:
    """The cache entry of a model: its id and a hash of its description (two models may share an id, such as the
    default and its zero-shot restriction to a taxonomy, whose breed lists differ), and the OpenVINO version."""
    import openvino

    described = hashlib.sha256(json.dumps(spec.identity(), sort_keys=True).encode()).hexdigest()[:12]
    key = f"{model_id}-{described}-ov{openvino.__version__}-{LAYOUT}"
    return cache_home() / "openvino" / "".join(c if c.isalnum() or c in "._-@" else "_" for c in key)


def cached(spec: ModelSpec, model_id: str, threads: int) -> Compiled | None:
    """The cached conversion of the model (`spec` and `model_id`, as dogbreed.vision.models.describe_model gives them),
    compiled with `threads` threads; None where there is none. An unreadable entry is removed (the caller converts
    the network again)."""
    import openvino as ov

    folder = _cache_dir(spec, model_id)
    if not (folder / META).is_file():
        return None
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        stored = ModelSpec.from_json(meta["spec"], str(folder / META))
        if meta.get("model_id") != model_id or stored.identity() != spec.identity():
            raise ValueError(f"it holds another model, {meta.get('model_id')!r}")
        model = ov.Core().read_model(str(folder / NETWORK))
        compiled = _compiled(model, spec, model_id, str(meta["embedding_id"]), threads)
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is converted again
        log.warning("converting the network again: cached OpenVINO model %s unreadable (%s)", folder, e)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    try:
        os.utime(folder / META)  # its last use, which keeps it from prune()
    except OSError:
        pass  # a read-only cache is still used
    return compiled


def prune(root: Any, now: float | None = None) -> list[str]:
    """Remove what this module wrote under `root` that is no longer used: entries (folders holding a meta.json) not
    loaded for UNUSED_DAYS, and temporary folders of conversions killed over STALE_TMP_S ago. Anything else there is
    left alone. Returns the names removed."""
    now = time.time() if now is None else now
    removed = []
    try:
        children = list(os.scandir(root))
    except OSError:
        return removed
    for child in children:
        try:
            if not child.is_dir(follow_symlinks=False):
                continue
            if _TMP_NAME.fullmatch(child.name):
                stale = now - child.stat(follow_symlinks=False).st_mtime > STALE_TMP_S
            else:
                stale = now - os.stat(os.path.join(child.path, META)).st_mtime > UNUSED_DAYS * 86400
        except OSError:  # not an entry (no meta.json), or gone meanwhile
            continue
        if stale:
            shutil.rmtree(child.path, ignore_errors=True)
            removed.append(child.name)
    if removed:
        log.info("removed %d unused cached network(s) from %s: %s", len(removed), root, ", ".join(removed))
    return removed


def convert(outputs: Any, spec: ModelSpec, model_id: str, embedding_id: str, threads: int) -> Compiled:
    """Convert `outputs` (a dogbreed.vision.nets.Outputs) to OpenVINO, cache it under `model_id`, and compile it."""
    model = _convert(outputs, spec.preprocessing.input_size)
    folder = _cache_dir(spec, model_id)
    _save(model, folder, {"model_id": model_id, "embedding_id": embedding_id, "spec": spec.to_json()})
    prune(folder.parent)  # where the cache grows, what no one uses goes
    return _compiled(model, spec, model_id, embedding_id, threads)


def _compiled(model: Any, spec: ModelSpec, model_id: str, embedding_id: str, threads: int) -> Compiled:
    import openvino as ov

    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": max(1, int(threads)),
                                                      "INFERENCE_PRECISION_HINT": "f32"})
    return Compiled(spec, model_id, embedding_id, compiled.create_infer_request())


def _convert(outputs: Any, input_size: int) -> Any:
    import openvino as ov
    import torch

    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # The preprocessing's mean and std become constants of the converted network, which is what is meant.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        model = ov.convert_model(outputs.eval(), example_input=torch.zeros(1, input_size, input_size, 3, dtype=torch.uint8))
    model.reshape({0: ov.PartialShape([-1, input_size, input_size, 3])})  # any batch size
    return model


def _save(model: Any, folder: Any, meta: dict[str, Any]) -> None:
    """Write the IR and its meta.json in a temporary folder and rename it into place: a reader never sees half a model."""
    import openvino as ov

    tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex}")
    try:
        tmp.mkdir(parents=True)
        ov.save_model(model, str(tmp / NETWORK), compress_to_fp16=False)  # fp16 weights would change outputs
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, folder)
        except OSError:  # another actor put it there first
            pass
    except OSError as e:  # a read-only or full cache: run from memory
        log.warning("could not cache the converted network in %s: %s", folder, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
