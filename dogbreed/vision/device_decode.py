"""Decoding on the inference actor's device (``decode.device: accelerator``): JPEGs travel compressed, pixels are made there.

:class:`JpegShipper` (CPU tasks) reads each file, fingerprints it and checks its JPEG header without decoding a pixel;
plain JPEGs travel on as their compressed bytes, everything else is decoded by the sandboxed
:class:`~dogbreed.vision.predictors.Decoder` exactly as with ``decode.device: cpu``. :class:`DeviceDecoder` (in the inference
actor) decodes the JPEGs in batches with ``torchvision.io.decode_jpeg`` on its device (nvJPEG on CUDA), applies EXIF
orientation, makes the model crop and the face copy there, and sends any JPEG the device refuses to its own
sandboxed Decoder, so no photo is lost and none can take the actor down.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from typing import Any

import numpy as np

from dogbreed.config import FaceConfig, PhotoConfig
from dogbreed.vision import batch as batches
from dogbreed.vision import faces
from dogbreed.vision.batch import CROP, JPEG, KIND, ORIENTATION, PAYLOAD, Batch, column
from dogbreed.vision.decode import ImageError, decode_jpegs_on, fingerprint_of_bytes, jpeg_header, read_bytes
from dogbreed.vision.geometry import Geometry
from dogbreed.vision.predictors import Decoder, _node_id
from dogbreed.vision.preprocessing import Preprocessing

# Full-size pixels decoded per decode_jpeg call: bounds the device memory a batch of 12-MP photos takes
# (3 bytes each, plus a float copy of one photo at a time while it is resized): about 1.2 GB here.
CHUNK_PIXELS = 400_000_000
_TORCH_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest-exact"}  # PIL filter -> torch mode


CPU_ASPECT = 64  # a JPEG more elongated than 1:64 is decoded on the CPU (a 1x65000 one asked the device for 51 GB)


def wants_accelerator(where: str, num_gpus: float) -> bool:
    """Whether the scan decodes JPEGs in its inference actors (decode.device, and the GPUs each actor gets)."""
    return where == "accelerator" or (where == "auto" and num_gpus > 0)


def device_supports(prep: Preprocessing) -> bool:
    """torch has no Lanczos resize: weights that ask for it keep the CPU decode path."""
    return prep.interpolation in _TORCH_MODES


class JpegShipper:
    """CPU-task stage: read + fingerprint + JPEG header check; ship plain JPEGs compressed, decode the rest as today.

    Output: the Decoder's columns without ``image``, plus ``payload`` (JPEG bytes, or the bytes of the crop the
    sandboxed Decoder made; empty for error rows), ``payload_kind`` and ``orientation``.
    """

    def __init__(self, prep: Preprocessing, face: FaceConfig | None = None, photos: PhotoConfig | None = None,
                 shared: bool = False):
        self.cfg = photos or PhotoConfig()
        self.decoder = Decoder(prep, face, self.cfg, shared)  # its sandboxed child starts only if a file needs it

    def _probe(self, raw: bytes) -> dict[str, Any] | None:
        try:
            data = read_bytes(raw, self.cfg.max_bytes)
        except ImageError:
            return None  # the Decoder reads it again and writes the same error row as the CPU path
        head = jpeg_header(data, self.cfg.max_pixels)
        if head is None:
            return None
        w, h, orientation = head
        if max(w, h) > CPU_ASPECT * min(w, h):  # resized whole on the device it could take gigabytes; the CPU path
            return None  # resizes only the part inside the crop
        return {PAYLOAD: data, "width": w, "height": h, ORIENTATION: orientation, "fingerprint": fingerprint_of_bytes(data)}

    def __call__(self, batch: Batch) -> Batch:
        batch = batches.clean(batch)
        probed = [self._probe(raw) for raw in batches.raw_paths(batch)]
        rest = [i for i, p in enumerate(probed) if p is None]
        rows: list[dict[str, Any]] = [{"ok": True, "status": None, "error": None, "error_kind": None,
                                       "face_count": 0, "faces": "[]", KIND: JPEG, **p} if p else {} for p in probed]
        if rest:
            decoded = self.decoder({k: np.asarray(v)[rest] for k, v in batch.items()})
            for j, i in enumerate(rest):
                ok = bool(decoded["ok"][j])
                rows[i] = {k: decoded[k][j] for k in ("ok", "status", "error", "error_kind", "fingerprint", "width",
                                                      "height", "face_count", "faces")}
                rows[i].update({PAYLOAD: decoded["image"][j].tobytes() if ok else b"", KIND: CROP if ok else None,
                                ORIENTATION: 1})
        rows = [{**r, "decode_node": _node_id()} for r in rows]
        out = dict(batch)
        out.update({name: column((r[name] for r in rows), dtype) for name, dtype in batches.SHIPPED.items()
                    if name not in batches.LISTED})
        return out

    def close(self) -> None:
        self.decoder.close()


def orient(img, orientation: int):
    """EXIF orientation (1-8) applied to a (C, H, W) tensor, as PIL's ImageOps.exif_transpose does to an image."""
    import torch

    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.transpose(-2, -1).flip(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def model_crop(img, geometry: Geometry):
    """decode.model_crop on a (3, H, W) uint8 tensor, per the same geometry: resize (antialiased, PIL's filters),
    pad, crop; returns (S, S, 3)."""
    import torch
    import torch.nn.functional as F

    _, h, w = img.shape
    plan = geometry.crop((w, h))
    (nw, nh), (pl, pt, pr, pb), (left, top, right, bottom) = plan.resize, plan.pad, plan.box
    mode = _TORCH_MODES[geometry.interpolation]
    x = img.unsqueeze(0).float()
    if (nh, nw) != (h, w):
        smooth = mode in ("bicubic", "bilinear")  # antialias=True is torch's PIL-like filter (PIL's a = -0.5 cubic)
        x = F.interpolate(x, size=(nh, nw), mode=mode, antialias=smooth, **({"align_corners": False} if smooth else {}))
    x = x[0].round_().clamp_(0, 255)
    if pl or pt or pr or pb:
        canvas = torch.tensor(geometry.fill, dtype=x.dtype, device=x.device).view(3, 1, 1).repeat(1, nh + pt + pb, nw + pl + pr)
        canvas[:, pt:pt + nh, pl:pl + nw] = x
        x = canvas
    return x[:, top:bottom, left:right].to(dtype=img.dtype).permute(1, 2, 0)


def reductions(w: int, h: int, geometry: Geometry) -> list[int]:
    """The integer reductions decode makes of a w x h (upright) JPEG before resizing, as the geometry decides them:
    the DCT scale Pillow's draft decodes at, then a box reduction if it is still twice as large as needed. On the
    device both are box reductions of the full-size decode."""
    need = geometry.need((w, h))
    draft = geometry.draft((w, h), need)
    decoded = geometry.drafted((w, h), draft)
    box = geometry.box_factor(decoded, (w, h), need)
    return [f for f in (draft, box) if f > 1]


def _box_spans(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last input pixel of each output pixel of PIL's BOX reduction, in PIL's own double arithmetic
    (Resample.c: a pixel counts when (j - centre + 0.5) / scale lies in (-0.5, 0.5]), so ties fall the same way."""
    scale = n_in / n_out
    centre = (np.arange(n_out) + 0.5) * scale
    first = np.maximum((centre - scale * 0.5 + 0.5).astype(np.int64), 0)
    j = first[:, None] + np.arange(int(np.ceil(scale)) + 2)[None, :]
    x = (j - centre[:, None] + 0.5) * (1.0 / scale)
    inside = (x > -0.5) & (x <= 0.5) & (j < n_in)
    lo = np.where(inside.any(1), j[np.arange(n_out), inside.argmax(1)], first)
    return lo, lo + inside.sum(1) - 1


def _box(x, n_out: int, dim: int):
    """PIL's BOX reduction along one axis of an int32 tensor, from integer prefix sums, rounded half up (as PIL's
    fixed point rounds it)."""
    import torch

    lo, hi = (torch.from_numpy(v).to(x.device) for v in _box_spans(x.shape[dim], n_out))
    sums = torch.nn.functional.pad(x.cumsum(dim, dtype=torch.int64), (1, 0) if dim == -1 else (0, 0, 1, 0))
    total = sums.index_select(dim, hi + 1) - sums.index_select(dim, lo)
    count = (hi - lo + 1).view(-1) if dim == -1 else (hi - lo + 1).view(-1, 1)
    return torch.div(2 * total + count, 2 * count, rounding_mode="floor").to(torch.int32)


def small_copy(img, geometry: Geometry):
    """decode.small_copy on a (3, H, W) uint8 tensor: each channel box-reduced to the geometry's face copy size as
    PIL does it. Returns the (3, h, w) uint8 copy the face detector sees, and full-size pixels per pixel of it.
    """
    import torch

    _, h, w = img.shape
    sw, sh = geometry.small((w, h))
    x = img.to(torch.int32)
    if sw != w:
        x = _box(x, sw, -1)  # PIL resamples horizontally first, rounding to 8 bits between the passes
    if sh != h:
        x = _box(x, sh, -2)
    return x.to(torch.uint8), w / sw


class DeviceDecoder:
    """Actor stage before the network: JPEG payloads -> model crops + face boxes on ``device``; crops pass through.

    The output batch is what :class:`~dogbreed.vision.predictors.Decoder` makes, with ``image`` as a uint8 (N, S, S, 3)
    tensor on the device (BreedPredictor takes it without a copy back to the host).
    """

    def __init__(self, prep: Preprocessing, face: FaceConfig | None = None, photos: PhotoConfig | None = None,
                 device: Any = "cpu", face_threads: int = 1):
        import cv2
        import torch

        photos = photos or PhotoConfig()
        self.torch, self.prep, self.face = torch, prep, face or FaceConfig()
        self.geometry = prep.geometry(photos.face_side)
        self.device = torch.device(device)
        self.fallback = Decoder(prep, self.face, photos)  # sandboxed; its child starts at the first refusal
        faces.load_face_detector(self.face)
        # A cascade object is not thread-safe, so no thread pool: OpenCV's own threads (one cascade call spreads
        # its scales over them) use as many cores as the actor reserves.
        cv2.setNumThreads(face_threads)
        self.seconds: dict[str, float] = defaultdict(float)  # where the actor's decode time goes (dogbreed bench)
        self.fallbacks = 0

    def _timed(self, stage: str, t0: float) -> float:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)  # honest stage times; the copies back synchronise anyway
        t = time.perf_counter()
        self.seconds[stage] += t - t0
        return t

    def _decode_chunk(self, datas: list[bytes]) -> list[Any]:
        """One batched decode on the device (dogbreed.vision.decode.decode_jpegs_on); None for a JPEG it refuses."""
        t = time.perf_counter()
        out = decode_jpegs_on(datas, self.device)
        self._timed("decode", t)
        return out

    def _decoded(self, items: list[tuple[int, bytes, int]]):
        """(row, decoded tensor or None) for (row, JPEG bytes, declared pixels), one chunk at a time: at most about
        CHUNK_PIXELS full-size pixels are held on the device while the chunk is turned into crops."""
        chunk: list[tuple[int, bytes]] = []
        budget = 0
        for row, data, pixels in [*items, (-1, b"", 0)]:
            if chunk and (row < 0 or budget + pixels > CHUNK_PIXELS):
                rows, imgs = [r for r, _ in chunk], self._decode_chunk([d for _, d in chunk])
                chunk, budget = [], 0
                while rows:  # hand each photo over and drop it here, so a prepared one is freed at once
                    yield rows.pop(0), imgs.pop(0)
            if row >= 0:
                chunk.append((row, data))
                budget += pixels

    def _prepare(self, img, orientation: int, width: int, height: int):
        """(crop, small copy, small_to_full) for one decoded JPEG, or None if it does not match its header."""
        img = orient(img, orientation)
        if tuple(img.shape) != (3, height, width):
            return None  # the device read another frame size than the header declared: the CPU path decides
        for factor in reductions(width, height, self.geometry):
            img = self.torch.nn.functional.avg_pool2d(img[None].float(), factor, ceil_mode=True)[0].round_().to(img.dtype)
        small, _ = small_copy(img, self.geometry)
        return model_crop(img, self.geometry), small, width / small.shape[2]

    def _faces(self, smalls: list, scales: list[float]) -> list[list[tuple]]:
        """Face boxes (x, y, w, h, score) for the small RGB copies (device tensors), in full-size pixels.

        The seam for running the face detector batched on the device: it would take ``smalls`` in one call
        here. YuNet (yuface) and Haar run on the CPU, on host copies, one photo at a time.
        """
        return [faces.detect_faces(np.ascontiguousarray(g.permute(1, 2, 0).cpu().numpy()), s, self.face)
                for g, s in zip(smalls, scales)]

    def __call__(self, batch: Batch) -> Batch:
        torch = self.torch
        batch = batches.clean(batch)  # fresh, writable columns of the declared types (Arrow makes NaN of None)
        n, size = len(batch["path"]), self.prep.input_size
        kinds = batch[KIND]
        out = {k: v for k, v in batch.items() if k not in (PAYLOAD, KIND, ORIENTATION)}
        images = torch.zeros((n, size, size, 3), dtype=torch.uint8, device=self.device)
        t = time.perf_counter()
        crops = [i for i in range(n) if kinds[i] == CROP]
        if crops:
            host = np.stack([np.frombuffer(batch[PAYLOAD][i], np.uint8).reshape(size, size, 3) for i in crops])
            images[torch.as_tensor(crops)] = torch.from_numpy(host).to(self.device)
        jpegs = [(i, batch[PAYLOAD][i], int(batch["width"][i]) * int(batch["height"][i])) for i in range(n)
                 if kinds[i] == JPEG]
        self._timed("copy", t)
        done, smalls, scales, refused = [], [], [], []
        for i, img in self._decoded(jpegs):
            t = time.perf_counter()
            try:
                ready = None if img is None else self._prepare(img, int(batch[ORIENTATION][i]), int(batch["width"][i]),
                                                               int(batch["height"][i]))
            except Exception:  # noqa: BLE001 - e.g. out of device memory on a huge photo: the CPU path takes it
                ready = None
            del img
            self._timed("resize", t)
            if ready is None:
                refused.append(i)
                continue
            images[i], small, scale = ready
            done.append(i)
            smalls.append(small)
            scales.append(scale)
        t = time.perf_counter()
        for i, boxes in zip(done, self._faces(smalls, scales)):
            out["faces"][i], out["face_count"][i] = json.dumps(boxes), len(boxes)
        t = self._timed("faces", t)
        if refused:
            self._cpu(batch, refused, out, images)
            self._timed("cpu fallback", t)
        out["image"] = images
        return out

    def _cpu(self, batch: Batch, rows: list[int], out: Batch, images) -> None:
        """JPEGs the device refused, through the sandboxed CPU decoder (same guards, same error rows)."""
        self.fallbacks += len(rows)
        sub = {k: np.asarray(v)[rows] for k, v in out.items() if k in batch}
        decoded = self.fallback(sub)
        for j, i in enumerate(rows):
            for k in ("ok", "status", "error", "error_kind", "fingerprint", "width", "height", "face_count", "faces"):
                out[k][i] = decoded[k][j]
            if decoded["ok"][j]:
                images[i] = self.torch.from_numpy(decoded["image"][j]).to(self.device)

    def close(self) -> None:
        self.fallback.close()
