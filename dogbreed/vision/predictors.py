"""Callables that Ray Data runs on batches; each loads what it needs once and is pure on numpy batches.

:class:`Decoder` (CPU tasks) turns listed files into 224-px model crops plus face boxes, so only
small uint8 arrays travel through the object store; each photo is decoded in a sandboxed child process.
:class:`BreedPredictor` (actor pool, GPU when present) runs one backbone pass per batch for both the dog
score and the breed. Both are usable without Ray: ``BreedPredictor()(Decoder(...)(batch))``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from dogbreed.config import FaceConfig, PhotoConfig
from dogbreed.vision import batch, decision
from dogbreed.vision.batch import Batch
from dogbreed.vision.preprocessing import Preprocessing
from dogbreed.vision.worker import DECODE_NICE, PhotoReader, PhotoTask, shared_reader


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - outside Ray there is no node
        return None


class Decoder:
    """LISTED -> DECODED batches (dogbreed.vision.batch): read + decode + faces, each photo in a sandboxed child.

    A photo that crashes or hangs the child becomes an error row naming the signal or the time limit; the
    child is restarted for the rest of the batch. The child lives as long as this object.
    """

    def __init__(self, prep: Preprocessing, face: FaceConfig | None = None, photos: PhotoConfig | None = None,
                 shared: bool = False):
        photos = photos or PhotoConfig()
        self.prep, self.shared = prep, shared
        self.task = PhotoTask(prep.geometry(photos.face_side), photos, face or FaceConfig())
        # shared: the worker process's reader, kept across Ray tasks (one child started per process, not per task)
        self.reader = (shared_reader if shared else PhotoReader)(self.task, nice=DECODE_NICE)

    def __call__(self, listed: Batch) -> Batch:
        listed = batch.clean(listed)
        results = [self.reader(raw) for raw in batch.raw_paths(listed)]
        return batch.decoded(listed, results, self.prep.input_size, _node_id())

    def close(self) -> None:
        if not self.shared:
            self.reader.close()


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
        """uint8 NHWC photos as a tensor on the device; on CUDA through the reused pinned buffer."""
        torch = self.torch
        if isinstance(images, torch.Tensor):  # made on this device already (decode.device: accelerator, dogbreed.vision.device_decode)
            return images.to(self.device)
        x = torch.from_numpy(np.ascontiguousarray(images))
        if self.device.type == "cuda":
            if self._pinned is None or self._pinned.shape[0] < len(x) or self._pinned.shape[1:] != x.shape[1:]:
                self._pinned = torch.empty(x.shape, dtype=torch.uint8, pin_memory=True)
            staged = self._pinned[:len(x)]
            staged.copy_(x)
            # Safe to reuse next batch: results are copied back before then, which waits for this stream.
            x = staged.to(self.device, non_blocking=True)
        return x

    def _autocast(self):
        return self.torch.autocast(self.device.type, dtype=self.torch.bfloat16, enabled=self.device.type == "cuda")


class FeatureExtractor(_OnDevice):
    """Pooled bottleneck features of model crops (training's cached-feature stages); loads the backbone once."""

    def __init__(self, backbone: str, weights: str | None, pretrained: bool, prep: dict, device: str = "auto"):
        from dogbreed.vision.nets import BreedNet, create_backbone

        super().__init__(BreedNet(create_backbone(backbone, weights, pretrained)), Preprocessing(**prep), device)

    def __call__(self, batch: Batch) -> Batch:
        from dogbreed.vision.nets import normalise

        with self.torch.inference_mode(), self._autocast():
            feats = self.net.features(normalise(self._input(batch["x"]), self.prep)).float().cpu().numpy()
        return {**{k: v for k, v in batch.items() if k != "x"}, "x": feats}  # labels and ids pass through


class _TorchOutputs(_OnDevice):
    """The model in torch on its device (a GPU: bf16 autocast, pinned staging): dogbreed.vision.nets.Outputs, eager."""

    def __init__(self, model: Any, device: str, num_threads: int | None):
        from dogbreed.vision.models import LoadedModel, load_model
        from dogbreed.vision.nets import Outputs

        loaded = model if isinstance(model, LoadedModel) else load_model(model)
        self.spec, self.model_id, self.embedding_id = loaded.spec, loaded.model_id, loaded.embedding_id
        indices = self.spec.imagenet_breed_indices if self.spec.breed_source == "imagenet" else None
        super().__init__(Outputs(loaded.net, self.spec.preprocessing, indices), self.spec.preprocessing, device,
                         num_threads)

    def __call__(self, images: Any, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x = self._input(images)
        with self.torch.inference_mode(), self._autocast():
            imagenet, breeds, feats = self.net(x)
            if flip:
                breeds = (breeds + self.net(x.flip(2))[1]) / 2
        return imagenet.float().cpu().numpy(), breeds.float().cpu().numpy(), feats.float().cpu().numpy()


class BreedPredictor:
    """Dog score + top-k breeds + decision for decoded batches; the model is loaded once per instance.

    On a CPU the network runs in OpenVINO where it is installed (`runtime`), else and on GPUs in torch. Given what
    the driver's describe_model gave (`described`: spec and model_id; the scan's actors), a CPU predictor whose
    converted network is cached loads that alone, without torch or timm.
    """

    def __init__(self, model: Any = "default", top_k: int = 3, dog_threshold: float = 0.5,
                 count_dingo: bool = True, device: str = "auto", num_threads: int | None = None,
                 breed_flip: bool = False, runtime: str = "auto", embeddings: bool = True,
                 described: tuple[Any, str] | None = None):
        from dogbreed.breeds import taxonomy
        from dogbreed.vision import runtime as runtimes

        self.dog_indices = taxonomy.dog_class_indices(count_dingo)
        self.top_k, self.dog_threshold, self.breed_flip = top_k, dog_threshold, breed_flip
        self.embeddings = embeddings
        self._model, self._device, self._threads, self._torch = model, device, num_threads, None
        self._compiled = None
        if described and device == "cpu" and runtimes.resolve(runtime, "cpu") == "openvino":
            self._compiled = runtimes.cached(*described, num_threads or os.cpu_count() or 1)
        if self._compiled is None:
            engine = self._engine()
            self.runtime = runtimes.resolve(runtime, engine.device.type)
            if self.runtime == "openvino":  # the same weights in OpenVINO: same outputs, about 2.3x faster
                threads = engine.torch.get_num_threads()
                self._compiled = (runtimes.cached(engine.spec, engine.model_id, threads) or
                                  runtimes.convert(engine.net, engine.spec, engine.model_id, engine.embedding_id, threads))
        else:
            self.runtime = "openvino"
        source = self._compiled if self.runtime == "openvino" else self._torch
        self.spec, self.model_id, self.embedding_id = source.spec, source.model_id, source.embedding_id

    @classmethod
    def for_scan(cls, cfg: Any, model: Any = None, **kwargs: Any) -> "BreedPredictor":
        """The predictor a ScanConfig describes (model, top_k, threshold, dingo rule, test-time flip); `model`: that
        model already loaded (a LoadedModel), so it is not read twice."""
        return cls(cfg.model if model is None else model, cfg.top_k, cfg.dog_threshold, cfg.count_dingo_as_dog, breed_flip=cfg.breed_flip,
                   runtime=cfg.inference.runtime, embeddings=cfg.inference.embeddings, **kwargs)

    def _engine(self) -> _TorchOutputs:
        """The model in torch, loaded on first use (a predictor running a cached conversion needs it only for
        from_features)."""
        if self._torch is None:
            self._torch = _TorchOutputs(self._model, self._device, self._threads)
        return self._torch

    @property
    def device(self) -> Any:
        """Where the network runs: the torch device, or "cpu" for a converted network loaded alone."""
        return self._torch.device if self._torch is not None else "cpu"

    def _forward(self, images: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ImageNet probabilities, breed probabilities, pooled features) of uint8 NHWC photos. With breed_flip the
        breed is the mean over the photo and its mirror image (test-time augmentation); the dog score stays that of
        the photo as it is."""
        if self._compiled is None:
            return self._torch(images, self.breed_flip)
        imagenet, breeds, feats = self._compiled(images)
        if self.breed_flip:
            breeds = (breeds + self._compiled(np.asarray(images)[:, :, ::-1])[1]) / 2
        return imagenet, breeds, feats

    def from_features(self, feats: np.ndarray, chunk: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
        """(ImageNet probabilities, breed probabilities) of stored pooled features: the heads alone, as _forward
        runs them after the backbone (relabel). No test-time flip: a mirror image needs the photo."""
        engine = self._engine()
        torch = engine.torch
        imagenet_out, breeds_out = [], []
        with torch.inference_mode(), warnings.catch_warnings():
            # Features read from Arrow are read-only; the heads never write to their input, so no copy is made.
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            for start in range(0, len(feats), chunk):
                x = torch.from_numpy(np.require(feats[start:start + chunk], np.float32, ["C"])).to(engine.device)
                imagenet, breeds = engine.net.probabilities(x)
                imagenet_out.append(imagenet.cpu().numpy())
                breeds_out.append(breeds.float().cpu().numpy())
        if not imagenet_out:
            return np.zeros((0, 1000), np.float32), np.zeros((0, len(self.spec.class_names)), np.float32)
        if len(imagenet_out) == 1:
            return imagenet_out[0], breeds_out[0]
        return np.concatenate(imagenet_out), np.concatenate(breeds_out)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["ok"])
        ok = np.asarray(batch["ok"], dtype=bool)
        dog = np.full(n, np.nan, dtype=np.float32)
        topk: list[list[tuple[str, float]] | None] = [None] * n
        status = np.array(batch["status"], dtype=object)
        embedding = np.zeros((n, 0), dtype=np.float32)
        if ok.any():
            imagenet, breeds, feats = self._forward(batch["image"][ok])
            embedding = np.zeros((n, feats.shape[1]), dtype=np.float32)
            embedding[ok] = feats
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
            "embedding": embedding,  # (n, d) float32; rows not decoded are zeros here, null in the table
            "embedding_id": np.array([self.embedding_id if good else None for good in ok], dtype=object),
        })
        return out if self.embeddings else without_embeddings(out)


def without_embeddings(rows: Batch) -> Batch:
    """Predicted rows as `inference.embeddings: false` leaves them: no vectors shipped or stored, null ids."""
    out = {k: v for k, v in rows.items() if k != "embedding"}
    out["embedding_id"] = np.array([None] * len(rows["status"]), dtype=object)
    return out
