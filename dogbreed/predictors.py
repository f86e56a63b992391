"""Callables that Ray Data runs on batches; each loads what it needs once and is pure on numpy batches.

:class:`Decoder` (CPU tasks) turns listed files into 224-px model crops plus Haar face boxes, so only
small uint8 arrays travel through the object store. :class:`BreedPredictor` (actor pool, GPU when
present) runs one backbone pass per batch for both the dog score and the breed. Both are usable without
Ray: ``BreedPredictor()(Decoder(...)(batch))``.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from contextlib import contextmanager
from typing import Any

import numpy as np

from dogbreed import detect
from dogbreed.config import DecodeConfig, FaceConfig
from dogbreed.images import ImageError, decode, read_bytes
from dogbreed.models import Preprocessing

Batch = dict[str, np.ndarray]


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray there is no node
        return None


class _DecodeTimeout(BaseException):
    """Raised by the per-photo alarm. A BaseException so that no `except Exception` (or `except OSError`,
    which TimeoutError is) inside Pillow or images.py can swallow it and let a slow photo run on."""


@contextmanager
def _time_limit(seconds: float):
    """Raise _DecodeTimeout in this thread after `seconds` (main thread only; elsewhere no limit).

    An alarm set by someone else (e.g. pytest-timeout) is re-armed afterwards with its remaining time.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _alarm(signum, frame):
        raise _DecodeTimeout

    old_handler = signal.signal(signal.SIGALRM, _alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay:
            remaining = max(old_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, remaining, old_interval)


class Decoder:
    """Read + decode + Haar faces for a batch of listed files (columns path, error)."""

    def __init__(self, prep: Preprocessing, face: FaceConfig | None = None, decode_cfg: DecodeConfig | None = None,
                 extensions: list[str] | None = None):
        self.prep = prep
        self.face = face or FaceConfig()
        self.cfg = decode_cfg or DecodeConfig()
        self.extensions = {e.lower() for e in extensions} if extensions else None
        detect._cascade(self.face.cascade)  # fail here, once, if the cascade is missing

    def _one(self, path: str, listed_error: Any) -> dict[str, Any]:
        if listed_error:
            return {"status": "error", "error": str(listed_error)}
        ext = "." + path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if self.extensions is not None and ext not in self.extensions:
            return {"status": "skipped", "error": f"not a photo extension ({ext or 'none'})"}
        try:
            with _time_limit(self.cfg.timeout_s):
                data = read_bytes(path, self.cfg.max_bytes)
                d = decode(data, self.prep, self.face.max_side, self.cfg.max_pixels)
                faces = detect.detect_faces(d.gray, d.gray_scale, self.face)
        except ImageError as e:
            return {"status": "error", "error": str(e)}
        except _DecodeTimeout:
            return {"status": "error", "error": f"decoding took longer than {self.cfg.timeout_s:g} s"}
        except MemoryError:
            return {"status": "error", "error": "out of memory while decoding"}
        except Exception as e:  # noqa: BLE001 - one bad photo must never take its batch down
            return {"status": "error", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()}
        return {"status": None, "error": None, "width": d.width, "height": d.height, "image": d.model_input,
                "faces": json.dumps(faces), "face_count": len(faces)}

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["path"])
        errors = batch.get("listed_error", np.full(n, None, dtype=object))
        rows = [self._one(str(p), e) for p, e in zip(batch["path"], errors)]
        size = self.prep.input_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        for i, r in enumerate(rows):
            if r.get("image") is not None:
                images[i] = r["image"]
        out = {k: v for k, v in batch.items() if k != "listed_error"}
        out.update({
            "ok": np.array([r["status"] is None for r in rows], dtype=bool),
            "status": np.array([r["status"] for r in rows], dtype=object),
            "error": np.array([r["error"] for r in rows], dtype=object),
            "width": np.array([r.get("width", -1) for r in rows], dtype=np.int32),
            "height": np.array([r.get("height", -1) for r in rows], dtype=np.int32),
            "face_count": np.array([r.get("face_count", 0) for r in rows], dtype=np.int32),
            "faces": np.array([r.get("faces", "[]") for r in rows], dtype=object),
            "image": images,
            "decode_node": np.array([_node_id()] * n, dtype=object),
        })
        return out


class BreedPredictor:
    """Dog score + top-k breeds + decision for decoded batches; the model is loaded once per instance."""

    def __init__(self, model: str = "default", top_k: int = 3, dog_threshold: float = 0.5,
                 count_dingo: bool = True, device: str = "auto", num_threads: int | None = None):
        import torch

        from dogbreed import labels
        from dogbreed.models import load_model

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        loaded = load_model(model)
        self.spec, self.model_id = loaded.spec, loaded.model_id
        self.net = loaded.net.to(self.device, memory_format=torch.channels_last).eval()
        prep = self.spec.preprocessing
        self.mean = torch.tensor(prep.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(prep.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self.dog_indices = labels.dog_class_indices(count_dingo)
        self.top_k, self.dog_threshold = top_k, dog_threshold
        self._pinned = None  # CUDA: one page-locked staging buffer, reused (pinning per batch costs more than the copy)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same 224-px shape

    def _to_device(self, images: np.ndarray):
        """uint8 NHWC on the device; on CUDA through the reused pinned buffer, copied asynchronously."""
        torch = self.torch
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type != "cuda":
            return x
        if self._pinned is None or self._pinned.shape[0] < len(x) or self._pinned.shape[1:] != x.shape[1:]:
            self._pinned = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
        staged = self._pinned[:len(x)]
        staged.copy_(x)
        # Safe to reuse next batch: _forward ends by copying results back, which waits for this stream.
        return staged.to(self.device, non_blocking=True)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        x = self._to_device(images)  # uint8 travels (4x fewer bytes than float); normalised on the device
        x = x.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.device.type == "cuda"):
            imagenet_logits, breed_logits = self.net(x)
        imagenet = imagenet_logits.float().softmax(-1)
        if self.spec.breed_source == "imagenet":
            breeds = imagenet[:, self.spec.imagenet_breed_indices]
            breeds = breeds / breeds.sum(-1, keepdim=True).clamp_min(1e-12)
        else:
            breeds = breed_logits.float().softmax(-1)
        return imagenet.cpu().numpy(), breeds.cpu().numpy()

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["ok"])
        ok = np.asarray(batch["ok"], dtype=bool)
        dog = np.full(n, np.nan, dtype=np.float32)
        topk: list[list[tuple[str, float]] | None] = [None] * n
        status = np.array(batch["status"], dtype=object)
        if ok.any():
            imagenet, breeds = self._forward(batch["image"][ok])
            scores = detect.dog_scores(imagenet, self.dog_indices)
            top1_dog = detect.top1_is_dog(imagenet, self.dog_indices)
            ranked = detect.top_k(breeds, self.spec.class_names, self.top_k)
            for j, i in enumerate(np.flatnonzero(ok)):
                dog[i], topk[i] = scores[j], ranked[j]
                status[i] = detect.decide(float(scores[j]), int(batch["face_count"][i]), self.dog_threshold,
                                          bool(top1_dog[j]))
        out = {k: v for k, v in batch.items() if k not in ("image", "ok")}
        out.update({
            "status": status,
            "dog_score": dog,
            "breed": np.array([t[0][0] if t else None for t in topk], dtype=object),
            "breed_prob": np.array([t[0][1] if t else np.nan for t in topk], dtype=np.float32),
            "breeds": np.array([[{"breed": b, "prob": p} for b, p in t] if t else None for t in topk] + [None],
                               dtype=object)[:n],
            "model_id": np.array([self.model_id] * n, dtype=object),
            "infer_node": np.array([_node_id()] * n, dtype=object),
        })
        return out
