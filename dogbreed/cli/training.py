"""Commands that train and measure: train, bench."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dogbreed.cli.app import ConfigOpt, ModelOpt, _scan_config, _user_errors, app
from dogbreed.config import ConfigError
from dogbreed.console import setup_logging


@app.command()
def train(
    data: Annotated[Optional[str], typer.Argument(
        help="Labelled photos: breed subfolders, Stanford Images/, or dogImages/{train,valid,test}; default: the config's.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Model artifact folder; checkpoints and results go beside it.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/train.yaml).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="fewshot, freeze, finetune or two-stage.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Taxonomy file, one class a line (or dogapp133): the model's "
                                                   "classes; default: one per folder.")] = None,
    missing_classes: Annotated[Optional[str], typer.Option(help="A class with neither photos nor an ImageNet class: "
                                                           "refuse (default) or drop it with a warning.")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Separate labelled folder for model selection.")] = None,
    test: Annotated[Optional[str], typer.Option("--test", help="Separate labelled folder for the final test report.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs of the main stage.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Ray Train workers (one GPU each with --gpu).")] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="One GPU per worker (bf16, channels_last).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join; default: RAY_ADDRESS or a local Ray.")] = None,
) -> None:
    """Train a breed classifier: few-shot prototypes, or fine-tuning with Ray Train (the same --out resumes a killed run)."""
    with _user_errors():
        from dogbreed.train import fit, load_train_config

        cfg = load_train_config(config, {"data": data, "out": out, "mode": mode, "classes": classes,
                                         "missing_classes": missing_classes,
                                         "val_data": val, "test_data": test,
                                         "epochs": epochs, "num_workers": workers, "use_gpu": gpu, "address": address})
        setup_logging(None)
        result = fit(cfg)
    typer.echo(json.dumps({"model_id": result.model_id, "artifact": str(result.artifact_dir), **result.metrics}))


@app.command()
def bench(
    mode: Annotated[str, typer.Option(help="speed: classic loop vs. scan vs. stage bounds; gpu: the scan against its "
                                           "GPU/CPU decode and model bounds, with GPU and CPU use; archive: listing, "
                                           "memory and first result at 10k-1M files; similar: index build, "
                                           "query latency, recall and relabel at 10k-1M rows.")] = "speed",
    photos: Annotated[int, typer.Option(min=2, help="speed: the scan runs on N and on 3N full-size photos (40: 120 in all).")] = 40,
    small_photos: Annotated[int, typer.Option(min=2, help="speed: N for the small photos (334: about 1,000 in all).")] = 334,
    classic: Annotated[int, typer.Option(min=1, help="speed: photos (of the N) for the slow classic dog-app loop; "
                                         "8 times as many small ones.")] = 8,
    files: Annotated[str, typer.Option(help="archive: comma-separated archive sizes, 1 to 2,000,000 files.")] = "2000,10000,100000,1000000",
    rows: Annotated[str, typer.Option(help="similar: comma-separated table sizes, 20 to 10,000,000 rows.")] = "10000,100000,1000000",
    workdir: Annotated[Path, typer.Option(help="Generated photos are kept here and reused by the next run; the folders "
                                          "bench makes here are marked, and it deletes no other.")] = Path("/tmp/dogbreed-bench"),
    data: Annotated[Optional[Path], typer.Option(help="Real photos to build from; default: ../shared/data where it "
                                                 "exists, else the bundled samples.")] = None,
    small: Annotated[bool, typer.Option("--small/--no-small", help="speed: also measure the original small photos.")] = True,
    config: ConfigOpt = None,
    model: ModelOpt = None,
) -> None:
    """Benchmarks: `--mode speed` or `--mode gpu` (12-MP and small photos), `--mode archive` (10k to 1M files) or
    `--mode similar` (10k to 1M rows)."""
    with _user_errors():
        from dogbreed.bench.photos import data_folder, find_sources

        if mode not in ("speed", "gpu", "archive", "similar"):
            raise ConfigError(f"--mode {mode!r}: expected speed, gpu, archive or similar")
        source = data_folder(data)  # --data given: a folder of photos, or one sentence
        if mode == "archive":
            from dogbreed.bench.archive import MAX_FILES, run_archive_benchmark
            from dogbreed.bench.archive import format_report as archive_report
            from dogbreed.bench.workdir import parse_sizes

            sizes = parse_sizes(files, "--files", 1, MAX_FILES)
            typer.echo(archive_report(run_archive_benchmark(workdir, sizes, source, log=typer.echo)))
            return
        if mode == "similar":
            from dogbreed.bench.vectors import MAX_ROWS, QUERIES, run_vector_benchmark
            from dogbreed.bench.vectors import format_report as vector_report
            from dogbreed.bench.workdir import claim, parse_sizes

            sizes = parse_sizes(rows, "--rows", QUERIES, MAX_ROWS)
            claim(workdir, [f"similar-{n}" for n in sizes])  # before the photos are read, as well as before the tables
            sources = find_sources(source, log=typer.echo)
            typer.echo(vector_report(run_vector_benchmark(workdir, sizes, sources, log=typer.echo)))
            return
        from dogbreed.vision import faces

        # The detector that will really run (yunet falls back to haar where yuface has no wheel), decided once: the
        # stage bounds load it directly, and asked for yunet there they failed after the scans (on the GPU machine).
        cfg = _scan_config(config, model=model)
        cfg = cfg.model_copy(update={"face": faces.resolved(cfg.face)})
        if mode == "gpu":
            from dogbreed.bench.gpu import format_gpu_report, run_gpu_benchmark

            report = run_gpu_benchmark(workdir, cfg, n=photos, small=small, log=typer.echo,
                                       sources=find_sources(source, log=typer.echo))
            typer.echo(format_gpu_report(report))
            return
        from dogbreed.bench.speed import run_benchmark
        from dogbreed.bench.speed_report import format_report

        report = run_benchmark(workdir, cfg, n=photos, classic_n=classic, small=small, small_n=small_photos,
                               sources=find_sources(source, log=typer.echo))
    typer.echo(format_report(report))
