"""Typed configuration for the jobs, read from configs/*.yaml plus command-line overrides.

Unknown keys and wrong types fail with the key's dotted name and the file they came from.
"""

from __future__ import annotations

import os
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from dogbreed.errors import UsageError, read_text
from dogbreed.vision.geometry import FACE_SIDE

# What counts as a photo, for the scan and for labelled folders alike (the README's format table).
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".orf", ".rw2", ".raf", ".pef",
                  ".srw", ".erf", ".3fr", ".kdc", ".dcr", ".mos", ".iiq", ".x3f", ".mrw", ".rwl")
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".heic", ".heif",
                    ".heics", ".heifs", ".hif", ".avif", ".avifs", ".jxl") + RAW_EXTENSIONS


DAY_S = 86_400.0  # the longest lease or per-photo limit accepted: an infinite one overflowed the clock (a traceback)


def cache_home() -> Path:
    """Where dogbreed keeps caches it can always rebuild (vector indexes of tables it cannot write beside, compiled
    networks): $DOGBREED_CACHE, else $XDG_CACHE_HOME/dogbreed, else ~/.cache/dogbreed."""
    given = os.environ.get("DOGBREED_CACHE")
    if given:
        return Path(given)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dogbreed"


def expand_home(value: str) -> str:
    """A path that begins with ~ or ~user, as a shell would expand it (YAML and --opt=~/x are not expanded by the
    shell); anything else, URIs included, as given."""
    return os.path.expanduser(value) if value.startswith("~") else value


LocalPath = Annotated[str, AfterValidator(expand_home)]  # a config value naming a file or folder (or a URI)


class ConfigError(UsageError):
    """A configuration file or override that cannot be used; the message names the key."""


class _Strict(BaseModel):
    # extra="forbid": a misspelt key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FaceConfig(_Strict):
    """Face detection on a downscaled copy of each photo: the YuNet CNN, or the classic OpenCV Haar cascade."""

    # yunet finds faces on 100% of humans/, also rotated 30 degrees, and on 1.5% of dog photos (all real people);
    # haar on 98.3%, 6.7% rotated, and 2% of dog photos (see the README's detector table). Without the yuface package
    # (wheels for CPython 3.10 and 3.11 only) yunet falls back to haar, with a warning, and settings_id says haar.
    detector: Literal["yunet", "haar"] = Field("yunet", description="yunet (CNN, needs the yuface package) or haar")
    min_score: float = Field(0.9, gt=0.0, le=1.0, description="yunet: confidence a face needs, upright or turned")
    verify_score: float = Field(0.5, gt=0.0, le=1.0, description="yunet: weaker candidates down to this are looked "
                                "at again turned by +-rotate_deg, which finds tilted heads")
    rotate_deg: float = Field(30.0, ge=0.0, le=90.0, description="yunet: turn used to re-check candidates; 0 = upright only")
    max_verify: int = Field(4, ge=0, description="yunet: most candidates re-checked per photo (bounds the cost on fur)")
    # alt2 "found" faces in 2% of dog photos where the classic _default cascade did in 16%, at the same recall on people.
    cascade: LocalPath = Field("haarcascade_frontalface_alt2.xml", description="haar: file in cv2.data.haarcascades, or a path")
    scale_factor: float = Field(1.1, gt=1.0, description="haar: cascade pyramid step")
    min_neighbors: int = Field(7, ge=0, description="haar: overlapping detections a face needs; higher = fewer false "
                               "faces on fur")
    min_size: int = Field(24, ge=8, description="haar: smallest face, in pixels of the downscaled copy")


class PhotoConfig(_Strict):
    """How photo files are opened, by the scan and by training alike: the guards, and the size they are decoded to."""

    max_pixels: int = Field(180_000_000, ge=1, description="decompression-bomb guard on declared width*height")
    max_bytes: int = Field(200_000_000, ge=1, description="files larger than this are refused unread")
    timeout_s: float = Field(60.0, gt=0, le=DAY_S, description="per-photo limit (at most a day); a photo still decoding "
                             "then is declared hung, its decoder process is killed and it becomes an error row")
    max_memory_mb: int | None = Field(4096, ge=256, le=1 << 30, description="memory cap of a decoder process (RLIMIT_DATA); a photo "
                                      "needing more becomes an error row instead of waking the OOM killer; null = none")
    plugins: list[LocalPath] = Field(default_factory=list, description="Pillow plugins imported in each decoder process: "
                               "module names or .py files")
    face_side: int = Field(FACE_SIDE, ge=64, description="longest side of the small copy the face detector sees; a "
                           "photo is decoded at the smallest scale that serves it and the model crop, so training "
                           "must use the scan's value to make the scan's crops")


class DecodeConfig(_Strict):
    """The scan's decode tasks: each reads, decodes and searches photos for faces in a sandboxed child process."""

    batch_size: int = Field(8, ge=1, description="photos per decode call; results stream on in blocks of about this many")
    block_rows: int = Field(2048, ge=1, description="most paths per input block; a small run is cut finer so that every "
                            "decode task has work")
    concurrency: int | None = Field(None, ge=1, description="max parallel decode tasks; null = as many as CPUs allow")
    num_cpus: float = Field(0.75, gt=0, description="CPUs reserved per decode task; 2 x 0.75 + the CPU actor's 0.5 fill 2 cores")
    max_retries: int = Field(2, ge=0, description="retries of a decode task whose worker died; then its photos are "
                             "error rows ('lost'), retried next run")
    device: Literal["cpu", "accelerator", "auto"] = Field(
        "cpu", description="where JPEG pixels are decoded: cpu = in the decode tasks (sandboxed); accelerator = the "
        "tasks only read and check JPEG headers and the inference actor decodes batches on its device (nvJPEG on a "
        "GPU), other files keep the CPU path; auto = accelerator when the actors get a GPU")


class InferenceConfig(_Strict):
    """The actor pool that runs the network; one GPU per actor when the cluster has GPUs."""

    batch_size: int = Field(16, ge=1, description="images per forward pass; 16 is fastest per image on CPU, raise on GPU")
    concurrency: int | None = Field(None, ge=1, description="number of actors; null = one per GPU, or 1 on CPU")
    num_gpus: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="GPUs per actor; auto = 1 if the cluster has GPUs, else 0")
    max_tasks_in_flight: int | None = Field(None, ge=1, description="batches queued per actor; null = Ray Data's default; "
                                            "1 spreads a short run evenly over every actor")
    wait_for_actors_s: float = Field(0, ge=0, description="wait up to this long for the whole pool before the first batch "
                                     "(0 = start with the first actor); on a cluster it keeps one actor from taking every batch")
    num_cpus: float = Field(0.5, gt=0, description="CPUs reserved per actor (on CPU its torch threads = max(1, int(num_cpus)))")
    runtime: Literal["auto", "torch", "openvino"] = Field(
        "auto", description="what runs the backbone on CPU: auto = OpenVINO where installed (same outputs, ~2.3x "
        "faster), else torch; GPUs always run torch")
    embeddings: bool = Field(True, description="store each decoded photo's feature vector (similar, relabel); false: "
                             "null, about 1.8 KB less per row")
    max_restarts: int = Field(3, ge=0, description="restarts of an inference actor that died; never unbounded")
    max_task_retries: int = Field(3, ge=0, description="retries of a batch whose actor died")


class ScanConfig(_Strict):
    """Everything the scan job needs; see configs/scan.yaml for the documented defaults."""

    roots: list[LocalPath] = Field(default_factory=list, description="folders or URIs (s3://, gs://) to scan recursively")
    out: LocalPath | None = Field(None, description="output Delta table: a local folder, or an s3:// or gs:// URI")
    model: LocalPath = Field("default", description="'default' (offline EfficientNet-Lite0), a model artifact folder, or "
                       "timm:NAME[=FILE.safetensors] (any timm ImageNet-1k classifier, zero-shot)")
    address: str | None = Field(None, description="Ray address; null = RAY_ADDRESS or a local Ray started here")
    mode: Literal["missing", "all"] = Field("missing", description="missing = only new/changed files; all = everything")
    top_k: int = Field(3, ge=1, le=20, description="breeds kept per photo")
    dog_threshold: float = Field(0.5, ge=0.0, le=1.0, description="dog score (probability mass on dog classes) for 'dog'")
    count_dingo_as_dog: bool = Field(True, description="ImageNet class 273 (dingo) counts as a dog")
    breed_flip: bool = Field(False, description="test-time flip: breed probabilities averaged over the photo and its "
                             "mirror image (one more network pass per photo); the dog score is unchanged")
    include_hidden: bool = Field(False, description="scan names starting with '.' too")
    extensions: list[str] = Field(
        default_factory=lambda: list(PHOTO_EXTENSIONS),
        description="files with other extensions get a 'skipped' row and are not opened",
    )
    follow_symlinks: Literal["inside", "all", "none"] = Field(
        "inside", description="inside = follow links that point inside the roots (others get a 'skipped' row); "
        "all = follow every link; none = follow no link")
    allow_empty_roots: bool = Field(False, description="accept a root that is empty although earlier runs saw files")
    max_deleted_fraction: float = Field(0.5, ge=0.0, le=1.0,
                                        description="refuse a run that would mark more than this share of known files deleted")
    allow_deletions: bool = Field(False, description="accept a run that marks more than max_deleted_fraction deleted")
    retry_errors: bool = Field(False, description="also retry error rows that cannot change until their file does")
    break_lock: bool = Field(False, description="take the output's lock even if its record says it is held, is "
                             "malformed or is dated in the future (a run holding it then fails to commit)")
    log_file: LocalPath | None = Field(None, description="append the job's log lines here")
    progress: bool | None = Field(None, description="one progress bar; null = only when stderr is a terminal")
    lock_lease_s: float = Field(60.0, ge=5, le=DAY_S, description="lease of the output's lock; a running scan renews it 4 times "
                                "per lease, a killed one's lock is free again after this long")
    vacuum_retention_hours: int = Field(168, ge=1, le=100 * 366 * 24, description="dogbreed compact keeps files older versions need for "
                                        "this long (time travel), then deletes them")
    photos: PhotoConfig = Field(default_factory=PhotoConfig)
    face: FaceConfig = Field(default_factory=FaceConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)


C = TypeVar("C", bound=BaseModel)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


# Keys that moved (so a config written for an older dogbreed gets a sentence saying where, not "unknown key").
MOVED = {f"decode.{k}": f"photos.{k}" for k in ("max_pixels", "max_bytes", "timeout_s", "max_memory_mb", "plugins")}
MOVED["face.max_side"] = "photos.face_side"


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    # a union's member tags ('constrained-float', "literal['auto']") are not keys: field names and list indices are
    key = ".".join(str(p) for p in first["loc"] if isinstance(p, int) or str(p).isidentifier()) or "(top level)"
    if first["type"] == "extra_forbidden":
        if key in MOVED:
            return f"{source}: key '{key}' is now '{MOVED[key]}'"
        return f"{source}: unknown key '{key}'"
    return f"{source}: key '{key}': {first['msg']} (got {_shown(first.get('input'))})"


_REPR = reprlib.Repr()  # a value as given, cut short: an alias bomb (300 bytes of YAML) expands to 10^9 items in repr
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 5, 5, 80, 80, 40


def _shown(value: Any) -> str:
    try:
        return _REPR.repr(value)
    except ValueError:  # an int past Python's 4,300-digit conversion limit
        return "a number too long to show"


def load_config(cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Build a `cls` config from an optional YAML file plus dotted-key overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(read_text(path))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply to be a dogbreed config") from None
        except ValueError as e:  # a number past Python's 4,300-digit conversion limit
            raise ConfigError(f"{path}: not a usable YAML value: {str(e).split(';')[0]}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
            if path is None:
                source = "command-line options"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML, saved beside every run's output."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
