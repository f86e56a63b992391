"""The training driver: fit(cfg) splits the data, runs Ray Train, exports the best epoch and tests it.

The test split is measured by evaluate.classify, the scan's own decoder and predictor, so the test_top1
stored in model.json is the accuracy `dogbreed evaluate --model` reports on the same photos.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

import dogbreed.train.report as report
from dogbreed.breeds.taxonomy import imagenet_index_for, read_classes
from dogbreed.cluster.session import is_private, start_ray
from dogbreed.config import ConfigError, ScanConfig, dump_config
from dogbreed.console import Terminated
from dogbreed.errors import Refused
from dogbreed.train.config import TrainConfig
from dogbreed.train.data import Item, Splits, feature_dataset, image_dataset, make_splits, photo_ids, view_features
from dogbreed.train.fewshot import fit_prototypes
from dogbreed.train.worker import STATE_FILE, stages, train_loop_per_worker
from dogbreed.vision.codecs import check_plugins
from dogbreed.vision.models import ModelSpec, read_artifact_spec, save_artifact
from dogbreed.vision.nets import BreedNet, ModelError, create_backbone
from dogbreed.vision.preprocessing import Preprocessing

log = logging.getLogger("dogbreed.train")
CONFIG_FILE = "train_config.yaml"
DATA_FILE = "train_data.json"  # the classes and data fingerprint the checkpoints under out/run_name were trained on
HARMLESS = {".DS_Store", "Thumbs.db", "desktop.ini", "lost+found"}  # what a desktop or a file system puts in any folder
# Keys that may change between a killed run and its restart without invalidating its checkpoints. Where the photos,
# the class list and the output are named is free too (data2 or /abs/data2, a moved folder): what they hold is what
# counts, and the data fingerprint and class names in train_data.json compare exactly that.
_RESUME_FREE_KEYS = {"num_workers", "use_gpu", "cpus_per_worker", "torch_threads", "feature_actors", "max_failures",
                     "address", "progress", "data", "val_data", "test_data", "out", "classes"}


@dataclass
class TrainResult:
    """What fit hands back: where the artifact is, its id, and its headline metrics."""

    artifact_dir: Path
    model_id: str
    metrics: dict[str, Any]


def _check_out(cfg: TrainConfig, out: Path) -> None:
    """Training writes only to a new or empty folder, or to one an earlier training wrote (its train_config.yaml):
    model.json, the weights, checkpoints and reports would overwrite what a folder of anything else holds (a user's
    files, another tool's model). A folder among the training photos is refused too: it would become a class."""
    for data in (cfg.data, cfg.val_data, cfg.test_data):
        if data and (out == Path(data).resolve() or Path(data).resolve() in out.parents):
            raise ConfigError(f"--out {out} lies inside the training photos {data}: give a folder outside them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a new or empty folder")
    try:
        entries = sorted(os.listdir(out)) if out.is_dir() else []
    except OSError as e:
        raise ConfigError(f"cannot read --out {out}: {e.strerror or e}") from None
    entries = [e for e in entries if e not in HARMLESS]
    if entries and CONFIG_FILE not in entries:
        raise ConfigError(f"--out {out} already holds {entries[0]!r}{' and more' if len(entries) > 1 else ''}, which "
                          "dogbreed training did not write; give a new or empty folder (training never writes beside "
                          "other files)")


def _check_resume(cfg: TrainConfig, out: Path, splits: Splits) -> None:
    """Refuse to resume a run whose checkpoints came from a different training setup, other classes or other photos;
    then record this run's setup (train_config.yaml) and data (train_data.json) beside its checkpoints."""
    import yaml

    _check_out(cfg, out)
    saved_path, run = out / CONFIG_FILE, out / cfg.run_name
    if saved_path.is_file() and run.is_dir():
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        now = cfg.model_dump(mode="json")
        changed = sorted(k for k in now if k not in _RESUME_FREE_KEYS and saved.get(k) != now[k])
        if changed:
            raise ConfigError(f"{run} holds checkpoints of a run with different {', '.join(changed)}; "
                              "use another out folder or run_name")
        _check_same_data(run, out / DATA_FILE, splits)
    out.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(dump_config(cfg), encoding="utf-8")
    (out / DATA_FILE).write_text(json.dumps({"class_folders": splits.class_folders, "class_names": splits.class_names,
                                             "data_fingerprint": splits.fingerprint}, indent=1), encoding="utf-8")


def _check_same_data(run: Path, data_file: Path, splits: Splits) -> None:
    """Checkpoints of other classes cannot load (the breed head has another shape). Checkpoints of other photos are
    refused too: the seeded split would move photos the weights trained on into validation and test, so the model
    selection and test_top1 would silently measure training photos."""
    saved = _saved_data(data_file)
    if saved is None:
        log.warning("%s does not record the data its checkpoints were trained on; resuming as is", run)
        return
    start_over = f"use another --out or run_name, or delete {run} to start over"
    before, now = saved.get("class_names") or [], splits.class_names
    if before != now:
        diff = [f"{what} {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}" for what, names in
                (("added", [c for c in now if c not in before]), ("removed", [c for c in before if c not in now])) if names]
        raise ConfigError(f"{run} holds checkpoints of a run on other classes ({'; '.join(diff) or 'another order'}); "
                          f"{start_over}")
    if saved.get("data_fingerprint") != splits.fingerprint:
        raise ConfigError(f"{run} holds checkpoints of a run on other photos (photos were added, removed or changed "
                          f"since, so its split no longer holds); {start_over}")


def _saved_data(data_file: Path) -> dict[str, Any] | None:
    """The classes and fingerprint of the run's data: train_data.json, or (a run of an older dogbreed) its finished
    artifact's model.json; None when neither tells."""
    try:
        return json.loads(data_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {data_file}: {e}; delete it to start over") from None
    try:
        spec, _ = read_artifact_spec(data_file.parent)
    except ModelError:
        return None
    return {"class_names": spec.class_names, "data_fingerprint": spec.training.get("data_fingerprint")}


def _datasets(cfg: TrainConfig, splits: Splits, prep: Preprocessing) -> dict[str, Any]:
    ds = {"train": image_dataset(splits.train, prep, True, cfg.batch_size, cfg.photos, cfg.decode),
          "val": image_dataset(splits.val, prep, False, cfg.batch_size, cfg.photos, cfg.decode)}
    if any(s.from_features for s in stages(cfg)):
        model = {"backbone": cfg.backbone, "weights": cfg.weights, "pretrained": cfg.pretrained}
        for name, items in (("train", splits.train), ("val", splits.val)):
            ds[f"{name}_features"] = feature_dataset(items, prep, model, cfg.feature_actors, cfg.use_gpu,
                                                     cfg.batch_size, cfg.photos, cfg.decode)
    return ds


def _run_trainer(cfg: TrainConfig, out: Path, splits: Splits, prep: Preprocessing, datasets: dict[str, Any]):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    steps = math.ceil(len(splits.train) / (cfg.num_workers * cfg.batch_size))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "class_folders": splits.class_folders,
                           "steps_per_epoch": steps, "preprocessing": asdict(prep)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        # Same storage_path + name = Ray Train restores the latest checkpoint of a killed run.
        run_config=RunConfig(name=cfg.run_name, storage_path=str(out),
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training in {out / cfg.run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)


def fit(cfg: TrainConfig) -> TrainResult:
    """Train per cfg with Ray Train, export the best epoch as a model artifact in cfg.out, test it, write results."""
    if cfg.data is None or cfg.out is None:
        raise ConfigError("training needs both 'data' and 'out'")
    t0 = time.perf_counter()
    out = Path(cfg.out).resolve()
    _check_out(cfg, out)
    check_plugins(cfg.photos.plugins)
    classes = read_classes(cfg.classes) if cfg.classes else None
    splits = make_splits(cfg.data, cfg.val_data, cfg.test_data, cfg.seed, cfg.extensions, classes,
                         carve=cfg.mode != "fewshot")
    splits = _keep_answerable(splits, cfg.missing_classes)
    if cfg.mode != "fewshot" and not splits.val:
        raise ConfigError(f"no validation photos: 10% of each class of {cfg.data} rounds to none; give --val, or more "
                          "photos")
    backbone = create_backbone(cfg.backbone, cfg.weights, cfg.pretrained)
    prep = Preprocessing.for_backbone(cfg.backbone, cfg.input_size)
    with _unwind_on_sigterm():
        shutdown = start_ray(cfg.address)
        try:
            _check_resources(cfg)  # before out is written: a refused run changes nothing
            # The listed photos are checked and recorded: a class that loses every photo in decoding loses it again
            # on a restart (the fingerprint pins the photos), so its checkpoints stay those of the same classes.
            _check_resume(cfg, out, splits)
            _progress_bars(cfg.progress)
            if cfg.mode == "fewshot":
                return _fit_fewshot(cfg, out, splits, backbone, prep, t0)
            return _fit_trainer(cfg, out, splits, backbone, prep, t0)
        finally:
            if shutdown:
                shutdown()  # what Ray had started, also when a SIGTERM unwinds the run


def _fit_trainer(cfg: TrainConfig, out: Path, splits: Splits, backbone, prep: Preprocessing, t0: float) -> TrainResult:
    """freeze, finetune, two-stage: Ray Train on the photos, then the best epoch exported and tested."""
    datasets = _datasets(cfg, splits, prep)
    if "train_features" in datasets:  # the photos that could be decoded are known: decide the classes on those
        kept = _after_decoding(splits, photo_ids(datasets["train_features"]), cfg.missing_classes)
        if kept.class_folders != splits.class_folders:  # a class dropped: its labels shift, so features are redone
            datasets = _datasets(cfg, kept, prep)
        splits = kept
    saved = _run_trainer(cfg, out, splits, prep, datasets)
    net = BreedNet(backbone, len(splits.class_folders))
    net.load_state_dict(saved["best_model"])
    history = saved["run"]["history"]
    report.write_history(history, out)
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
    spec.metrics |= _test_metrics(out, splits.test, cfg)
    spec.training["wall_seconds"] = round(time.perf_counter() - t0, 1)
    model_id = save_artifact(net, spec, out)  # same weights and identity: same model_id, metrics added
    return TrainResult(out, model_id, spec.metrics | {"wall_seconds": spec.training["wall_seconds"]})


def _keep_answerable(splits: Splits, missing: str) -> Splits:
    """A class with neither photos nor an ImageNet class cannot be answered: refused (naming it), or dropped."""
    has = {label for _, label in splits.train}
    neither = [i for i, c in enumerate(splits.class_folders) if i not in has and imagenet_index_for(c) is None]
    if not neither:
        return splits
    names = [splits.class_names[i] for i in neither]
    if missing == "refuse":
        raise ConfigError(f"{_classes(len(names))} neither photos that could be used nor an ImageNet class to start "
                          f"from: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}; add photos, or set "
                          "missing_classes: drop")
    log.warning("left out %s neither photos that could be used nor an ImageNet class: %s", _classes(len(names)),
                ", ".join(names))
    keep = [i for i in range(len(splits.class_folders)) if i not in set(neither)]
    new = {old: n for n, old in enumerate(keep)}

    def relabel(items: list[Item]) -> list[Item]:
        return [(p, new[y]) for p, y in items if y in new]

    return replace(splits, class_folders=[splits.class_folders[i] for i in keep], train=relabel(splits.train),
                   val=relabel(splits.val), test=relabel(splits.test))


def _classes(n: int) -> str:
    return "1 class that has" if n == 1 else f"{n} classes that have"


def _after_decoding(splits: Splits, used: Any, missing: str) -> Splits:
    """The training photos that could be decoded (indices `used` of splits.train): one warning line counts and names
    those left out (each photo's own line is logged inside a Ray worker, which the terminal never shows), and a class
    left with no photo and no ImageNet class is refused or dropped (_keep_answerable)."""
    used = [int(i) for i in used]
    kept = set(used)
    left = [p for i, (p, _) in enumerate(splits.train) if i not in kept]
    if left:
        log.warning("%d of %d training photos could not be used and were left out (unreadable, not a photo, or too "
                    "large): %s%s", len(left), len(splits.train), ", ".join(left[:3]), ", ..." if len(left) > 3 else "")
    return _keep_answerable(replace(splits, train=[splits.train[i] for i in used]), missing)


def _check_resources(cfg: TrainConfig) -> None:
    """Refuse, before any work, what a private local Ray can never hold: it never grows, so Ray Train's workers or the
    feature actors would wait for ever (as the scan refuses in scan.pipeline._inference_resources). A cluster joined
    by address may autoscale: there Ray waits, as it does for the scan."""
    import ray

    if not is_private(cfg.address):
        return
    have = ray.cluster_resources()
    features = cfg.mode == "fewshot" or any(s.from_features for s in stages(cfg))
    if cfg.use_gpu:
        need = max(cfg.num_workers if cfg.mode != "fewshot" else 0, cfg.feature_actors if features else 0)
        if have.get("GPU", 0) < need:
            who = " and ".join(w for w, on in (("Ray Train worker", cfg.mode != "fewshot"), ("feature actor", features)) if on)
            raise Refused(f"--gpu asks for {need} GPU{'s' * (need > 1)} (one per {who}) but this machine's Ray has "
                          f"{have.get('GPU', 0):g}: train on the CPU (--cpu), or join a cluster with GPUs (--address)")
    if cfg.mode == "fewshot":
        return
    # A stage that trains on photos decodes them in Ray Data tasks while the workers hold their CPUs
    decodes = not all(s.from_features for s in stages(cfg))
    need_cpus = cfg.num_workers * cfg.cpus_per_worker + (cfg.decode.num_cpus if decodes else 0)
    if need_cpus > have.get("CPU", 0) + 1e-6:
        tasks = f" and a decode task at decode.num_cpus {cfg.decode.num_cpus:g}" if decodes else ""
        raise Refused(f"{cfg.num_workers} Ray Train worker(s) at cpus_per_worker {cfg.cpus_per_worker:g}{tasks} need "
                      f"{need_cpus:g} CPUs, but this machine's Ray has {have.get('CPU', 0):g}: lower --workers or "
                      "cpus_per_worker")


@contextmanager
def _unwind_on_sigterm() -> Iterator[None]:
    """A SIGTERM during training unwinds as console.Terminated (one sentence, exit 1, Ray stopped).

    Without a handler of ours, the one Ray's core worker installs in ray.init aborts with a C++ stack dump (exit 134).
    And a handler that raises Terminated is not enough: inside ray.get (Ray Train's fit waits in one), Ray runs signal
    handlers in its check_signals, which passes on only KeyboardInterrupt (and SystemExit); any other exception
    surfaces later as a SystemError. So the handler raises KeyboardInterrupt, and here it becomes Terminated."""
    before = signal.getsignal(signal.SIGTERM)
    if before is signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def handler(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt:
        if got:
            raise Terminated("stopped by SIGTERM") from None
        raise
    finally:
        signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)


def _fit_fewshot(cfg: TrainConfig, out: Path, splits: Splits, backbone, prep: Preprocessing, t0: float) -> TrainResult:
    """Few-shot: features of every photo and its views (Ray Data), then calibrated prototypes (dogbreed.train.fewshot)."""
    import numpy as np

    model = {"backbone": cfg.backbone, "weights": cfg.weights, "pretrained": cfg.pretrained}
    X, views, used = view_features(splits.train, prep, model, cfg.fewshot_views, cfg.feature_actors, cfg.use_gpu,
                                   cfg.batch_size, cfg.photos, cfg.decode)
    splits = _after_decoding(splits, used, cfg.missing_classes)  # rows of X and views: splits.train, in order
    y = np.array([label for _, label in splits.train])
    index = np.array([-1 if (i := imagenet_index_for(c)) is None else i for c in splits.class_folders])
    classifier = backbone.get_classifier()
    fitted = fit_prototypes(X, views, y, index, classifier.weight.detach().numpy(), classifier.bias.detach().numpy(),
                            kappa=cfg.fewshot_kappa, seed=cfg.seed)
    net = BreedNet(backbone, len(splits.class_folders), head="prototypes")
    fitted.load_into(net.breed_head)
    counts = np.bincount(y, minlength=len(splits.class_folders))
    training = {"mode": "fewshot", "data": cfg.data, "classes": cfg.classes, "data_fingerprint": splits.fingerprint,
                "photos": int(len(y)), "views_per_photo": 1 + cfg.fewshot_views, "kappa": cfg.fewshot_kappa,
                "calibration": fitted.calibration, "classes_with_photos": int((counts > 0).sum()),
                "classes_from_imagenet_only": int(((counts == 0) & (index >= 0)).sum()), "seed": cfg.seed}
    spec = ModelSpec(backbone=cfg.backbone, class_names=splits.class_names, breed_source="head", head="prototypes",
                     preprocessing=prep, metrics={"loo_top1": fitted.loo_top1}, training=training)
    save_artifact(net, spec, out)
    spec.metrics |= _test_metrics(out, splits.test, cfg)
    spec.training["wall_seconds"] = round(time.perf_counter() - t0, 1)
    model_id = save_artifact(net, spec, out)
    return TrainResult(out, model_id, spec.metrics | {"wall_seconds": spec.training["wall_seconds"]})


def _test_metrics(model_dir: Path, items: list[Item], cfg: TrainConfig) -> dict[str, Any]:
    """The artifact's test metrics and report (model_dir/test), or none, with a note, when there are no test photos."""
    if not items:
        log.warning("no test photos%s: the model has no test metrics; give --test, or measure it later with "
                    "`dogbreed evaluate --model`", "" if cfg.mode == "fewshot" else " (10% of each class rounds to none)")
        return {}
    test = test_artifact(model_dir, items, cfg, model_dir / "test")
    return {"test_top1": test["top1"], "test_top5": test["top5"], "test_n": test["n"]}


def test_artifact(model_dir: str | Path, items: list[Item], cfg: TrainConfig,
                  out_dir: str | Path | None = None) -> dict[str, Any]:
    """Top-1/top-5, per-breed accuracy and confusion of an artifact on labelled photos, as the scan would see them."""
    from dogbreed.evaluation.breeds import classify

    scan_cfg = ScanConfig(model=str(model_dir), extensions=cfg.extensions, photos=cfg.photos)
    result = classify([p for p, _ in items], [y for _, y in items], scan_cfg)
    if out_dir is not None:
        spec, _ = read_artifact_spec(model_dir)
        report.write_test_report(result, spec.class_names, out_dir)
    return result


def _progress_bars(enabled: bool) -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = enabled
