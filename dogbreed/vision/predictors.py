"""Callables that Ray Data runs on batches; each loads what it needs once and is pure on numpy batches.

:class:`Decoder` (CPU tasks) turns listed files into 224-px model crops plus face boxes, so only
small uint8 arrays travel through the object store; each photo is decoded in a sandboxed child process.
:class:`BreedPredictor` (actor pool, GPU when present) runs one backbone pass per batch for both the dog
score and the breed. Both are usable without Ray: ``BreedPredictor()(Decoder(...)(batch))``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from typing import Any, Callable

import numpy as np

from dogbreed.config import DecodeConfig, FaceConfig
from dogbreed.vision import decision, faces
from dogbreed.vision.decode import ImageError, Preprocessing, decode, fingerprint_of_bytes, load_plugins, read_bytes
from dogbreed.vision.sandbox import Sandbox, SandboxError

Batch = dict[str, np.ndarray]
# Decoding runs ahead of the network and fills any idle core; a lower priority lets the inference actor, the stage
# that sets the pace on a shared node, take the CPU first whenever both want it.
DECODE_NICE = 5
PERMANENT, TRANSIENT = "permanent", "transient"  # error kinds: not retried on an unchanged file / retried next run


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray there is no node
        return None


def photo_worker(prep: dict, face: dict, decode_cfg: dict) -> Callable[[bytes], dict[str, Any]]:
    """Runs in the sandboxed child (see dogbreed.vision.sandbox): read, fingerprint, decode and find faces, per photo."""
    prep_, face_, cfg = Preprocessing(**prep), FaceConfig(**face), DecodeConfig(**decode_cfg)
    load_plugins(cfg.plugins)
    faces.load_face_detector(face_)  # fail at start-up, once, if the detector cannot be loaded
    import cv2

    cv2.setNumThreads(1)  # one photo at a time on one core: a decode task reserves under one CPU

    def one(raw_path: bytes) -> dict[str, Any]:
        fp = None
        try:
            data = read_bytes(raw_path, cfg.max_bytes)
            fp = fingerprint_of_bytes(data)
            d = decode(data, prep_, face_.max_side, cfg.max_pixels)
            del data
            boxes = faces.detect_faces(d.small, d.small_to_full, face_)
        except ImageError as e:
            return {"status": "error", "error": str(e), "error_kind": PERMANENT if e.permanent else TRANSIENT,
                    "fingerprint": fp}
        except MemoryError:
            return {"status": "error", "error": "out of memory while decoding (decode.max_memory_mb)",
                    "error_kind": PERMANENT, "fingerprint": fp}
        except Exception as e:  # noqa: BLE001 - one bad photo must never take its batch down
            msg = str(e).splitlines()[0] if str(e) else ""
            return {"status": "error", "error": f"{type(e).__name__}: {msg}".strip().rstrip(":"),
                    "error_kind": PERMANENT, "fingerprint": fp}
        return {"status": None, "error": None, "error_kind": None, "width": d.width, "height": d.height,
                "image": d.model_input, "faces": json.dumps(boxes), "face_count": len(boxes), "fingerprint": fp}

    return one


class Decoder:
    """Read + decode + faces for a batch of listed files (columns path, raw), each photo in a sandboxed child.

    A photo that crashes or hangs the child becomes an error row naming the signal or the time limit; the
    child is restarted for the rest of the batch. The child lives as long as this object.
    """

    def __init__(self, prep: Preprocessing, face: FaceConfig | None = None, decode_cfg: DecodeConfig | None = None):
        self.prep = prep
        self.face = face or FaceConfig()
        self.cfg = decode_cfg or DecodeConfig()
        self.sandbox = Sandbox("dogbreed.vision.predictors:photo_worker",
                               {"prep": asdict(prep), "face": self.face.model_dump(), "decode_cfg": self.cfg.model_dump()},
                               timeout_s=self.cfg.timeout_s, memory_mb=self.cfg.max_memory_mb, nice=DECODE_NICE)

    def _one(self, raw: bytes) -> dict[str, Any]:
        try:
            result, failure = self.sandbox(raw)
        except SandboxError as e:
            return {"status": "error", "error": str(e), "error_kind": TRANSIENT}
        if failure is not None:
            return {"status": "error", "error": failure, "error_kind": PERMANENT}
        return result

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["path"])
        raws = batch["raw"] if "raw" in batch else [None] * n
        rows = [self._one(bytes(r) if r is not None else os.fsencode(str(p))) for p, r in zip(batch["path"], raws)]
        size = self.prep.input_size
        images = np.zeros((n, size, size, 3), dtype=np.uint8)
        for i, r in enumerate(rows):
            if r.get("image") is not None:
                images[i] = r["image"]
        out = dict(batch)
        out.update({
            "ok": np.array([r["status"] is None for r in rows], dtype=bool),
            "status": np.array([r["status"] for r in rows], dtype=object),
            "error": np.array([r["error"] for r in rows], dtype=object),
            "error_kind": np.array([r.get("error_kind") for r in rows], dtype=object),
            "fingerprint": np.array([r.get("fingerprint") for r in rows], dtype=object),
            "width": np.array([r.get("width", -1) for r in rows], dtype=np.int32),
            "height": np.array([r.get("height", -1) for r in rows], dtype=np.int32),
            "face_count": np.array([r.get("face_count", 0) for r in rows], dtype=np.int32),
            "faces": np.array([r.get("faces", "[]") for r in rows], dtype=object),
            "image": images,
            "decode_node": np.array([_node_id()] * n, dtype=object),
        })
        return out

    def close(self) -> None:
        self.sandbox.close()


class _OnDevice:
    """A network loaded once per instance, fed uint8 NHWC batches that are normalised on its device."""

    def __init__(self, net, prep: Preprocessing, device: str = "auto", num_threads: int | None = None):
        import torch

        if num_threads:
            torch.set_num_threads(int(num_threads))
        self.torch = torch
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        self.net = net.to(self.device, memory_format=torch.channels_last).eval()
        self.prep = prep
        self._pinned = None  # CUDA: one page-locked staging buffer, reused (pinning per batch costs more than the copy)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # every batch has the same input shape

    def _input(self, images: np.ndarray):
        """uint8 NHWC to the normalised float input on the device; on CUDA through the reused pinned buffer."""
        from dogbreed.vision.models import normalise

        torch = self.torch
        if isinstance(images, torch.Tensor):  # made on this device already (decode.device: accelerator, dogbreed.vision.device_decode)
            return normalise(images.to(self.device), self.prep)
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            if self._pinned is None or self._pinned.shape[0] < len(x) or self._pinned.shape[1:] != x.shape[1:]:
                self._pinned = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
            staged = self._pinned[:len(x)]
            staged.copy_(x)
            # Safe to reuse next batch: results are copied back before then, which waits for this stream.
            x = staged.to(self.device, non_blocking=True)
        return normalise(x, self.prep)

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.device.type == "cuda")


class FeatureExtractor(_OnDevice):
    """Pooled bottleneck features of model crops (training's cached-feature stages); loads the backbone once."""

    def __init__(self, backbone: str, weights: str | None, pretrained: bool, prep: dict, device: str = "auto"):
        from dogbreed.vision.models import BreedNet, create_backbone

        super().__init__(BreedNet(create_backbone(backbone, weights, pretrained)), Preprocessing(**prep), device)

    def __call__(self, batch: Batch) -> Batch:
        with self.torch.inference_mode(), self._autocast():
            feats = self.net.features(self._input(batch["x"])).float().cpu().numpy()
        return {"x": feats, "label": batch["label"]}


class BreedPredictor(_OnDevice):
    """Dog score + top-k breeds + decision for decoded batches; the model is loaded once per instance."""

    def __init__(self, model: str = "default", top_k: int = 3, dog_threshold: float = 0.5,
                 count_dingo: bool = True, device: str = "auto", num_threads: int | None = None,
                 breed_flip: bool = False):
        from dogbreed.breeds import taxonomy
        from dogbreed.vision.models import load_model

        loaded = load_model(model)
        self.spec, self.model_id = loaded.spec, loaded.model_id
        super().__init__(loaded.net, self.spec.preprocessing, device, num_threads)
        self.dog_indices = taxonomy.dog_class_indices(count_dingo)
        self.top_k, self.dog_threshold, self.breed_flip = top_k, dog_threshold, breed_flip

    @classmethod
    def for_scan(cls, cfg: Any, **kwargs: Any) -> "BreedPredictor":
        """The predictor a ScanConfig describes (model, top_k, threshold, dingo rule, test-time flip)."""
        return cls(cfg.model, cfg.top_k, cfg.dog_threshold, cfg.count_dingo_as_dog, breed_flip=cfg.breed_flip, **kwargs)

    def _breeds(self, imagenet, breed_logits):
        if self.spec.breed_source == "imagenet":
            breeds = imagenet[:, self.spec.imagenet_breed_indices]
            return breeds / breeds.sum(-1, keepdim=True).clamp_min(1e-12)
        return breed_logits.float().softmax(-1)

    def _forward(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._input(images)
        with self.torch.inference_mode(), self._autocast():
            imagenet_logits, breed_logits = self.net(x)
            imagenet = imagenet_logits.float().softmax(-1)
            breeds = self._breeds(imagenet, breed_logits)
            if self.breed_flip:  # test-time augmentation: the breed is the mean over the photo and its mirror
                flip_imagenet, flip_breed = self.net(x.flip(-1))
                breeds = (breeds + self._breeds(flip_imagenet.float().softmax(-1), flip_breed)) / 2
        # The dog score stays that of the photo as it is: the flip only refines which breed.
        return imagenet.float().cpu().numpy(), breeds.float().cpu().numpy()

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["ok"])
        ok = np.asarray(batch["ok"], dtype=bool)
        dog = np.full(n, np.nan, dtype=np.float32)
        topk: list[list[tuple[str, float]] | None] = [None] * n
        status = np.array(batch["status"], dtype=object)
        if ok.any():
            imagenet, breeds = self._forward(batch["image"][ok])
            scores = decision.dog_scores(imagenet, self.dog_indices)
            top1_dog = decision.top1_is_dog(imagenet, self.dog_indices)
            ranked = decision.top_k(breeds, self.spec.class_names, self.top_k)
            for j, i in enumerate(np.flatnonzero(ok)):
                dog[i], topk[i] = scores[j], ranked[j]
                status[i] = decision.decide(float(scores[j]), int(batch["face_count"][i]), self.dog_threshold,
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
