"""The one typer app: each command loads config and calls one library function."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from dogbreed.config import ConfigError, ScanConfig, load_config
from dogbreed.console import Terminated, native_stderr_quiet, setup_logging, stop_on_sigterm
from dogbreed.errors import DogbreedError, Exit

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Find dogs and people in photo archives and name each dog's breed.")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/scan.yaml).")]
BreakLockOpt = Annotated[Optional[bool], typer.Option(
    "--break-lock", help="Take the output's lock whatever its record says (held, malformed, dated in the future).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="'default', a model artifact folder, or timm:NAME[=FILE.safetensors] (zero-shot ImageNet model).")]


def _one_line(text: str) -> str:
    """A message as one line: a newline or control character in a name (a path, a root) is shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _fail(code: int, label: str, message: str) -> typer.Exit:
    """One sentence on stderr, and the same line with its exit code in the log file (cron reads that)."""
    message = _one_line(message)
    typer.echo(f"{label}: {message}", err=True)
    logging.getLogger("dogbreed").info("%s (exit %d): %s", label, code, message)  # INFO: the file, not the console
    return typer.Exit(code)


@contextmanager
def _user_errors() -> Iterator[None]:
    """Errors a user can cause become one sentence and their exit code (dogbreed.errors), not a traceback.

    Only the project's own error types are caught here: a real bug still shows its traceback (and its
    one-line summary goes to the log file, with exit code 1).
    """
    try:
        yield
    except typer.Exit:
        raise
    except DogbreedError as e:
        raise _fail(e.exit_code, e.label, str(e)) from None
    except Terminated as e:
        raise _fail(Exit.FAILED, "failed", f"{e}; nothing was committed") from None
    except Exception as e:
        logging.getLogger("dogbreed").info("failed (exit %d): %s: %s", Exit.FAILED, type(e).__name__,
                                           _one_line(str(e).splitlines()[0]) if str(e) else "")
        raise  # a real bug: its traceback


def _scan_config(config: Path | None, **overrides) -> ScanConfig:
    return load_config(ScanConfig, config, overrides)


@app.command()
def scan(
    roots: Annotated[list[str], typer.Argument(help="Folders or URIs (s3://...) to scan recursively.")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Output Delta table: a folder, s3://... or gs://...")] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    mode: Annotated[Optional[str], typer.Option(help="missing (new/changed only) or all.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join; default: RAY_ADDRESS or a local Ray.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would be processed, change nothing.")] = False,
    allow_empty_roots: Annotated[Optional[bool], typer.Option("--allow-empty-roots", help="Accept a root that became empty.")] = None,
    allow_deletions: Annotated[Optional[bool], typer.Option(
        "--allow-deletions", help="Accept a run that records more than max_deleted_fraction of a root's files as deleted.")] = None,
    retry_errors: Annotated[Optional[bool], typer.Option(
        "--retry-errors", help="Also retry error rows that cannot change until their file does (corrupt, crash, hang).")] = None,
    break_lock: BreakLockOpt = None,
    log_file: Annotated[Optional[str], typer.Option(help="Append log lines to this file.")] = None,
    progress: Annotated[Optional[bool], typer.Option(
        "--progress/--no-progress", help="One progress bar; default: only when stderr is a terminal.")] = None,
) -> None:
    """Scan photo folders into Parquet: one row per file, committed atomically; exit 0 ok, 3 bad photos, 4/5 refused."""
    setup_logging(log_file)
    stop_on_sigterm()
    with native_stderr_quiet(not sys.stderr.isatty()), _user_errors():
        cfg = _scan_config(config, roots=roots, out=out, model=model, mode=mode, address=address,
                           allow_empty_roots=allow_empty_roots, allow_deletions=allow_deletions,
                           retry_errors=retry_errors, log_file=log_file, progress=progress, break_lock=break_lock)
        if cfg.log_file != log_file:
            setup_logging(cfg.log_file)
        from dogbreed.scan.job import run_scan

        summary = run_scan(cfg, dry_run=dry_run)
    logging.getLogger("dogbreed").info(summary.line())
    if dry_run:
        for title, paths, total in (("would process", summary.would_process, summary.processed),
                                    ("would record as deleted", summary.would_delete, summary.counts.get("deleted", 0))):
            if total:
                typer.echo(f"{title} ({total}, first {len(paths)}):")
                for path in paths:
                    typer.echo(f"  {path!r}" if not path.isprintable() else f"  {path}")
        typer.echo(summary.line())
        raise typer.Exit(Exit.OK)
    typer.echo(summary.line())
    raise typer.Exit(summary.exit_code)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Photo files.")],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    annotate: Annotated[Optional[Path], typer.Option(help="Write copies with the answer drawn on them here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per photo.")] = False,
) -> None:
    """Print the dog-app answer per photo: 'dog: <breed> (p)', 'human: looks like <breed> (p)' or 'neither'."""
    with _user_errors():
        cfg = _scan_config(config, model=model)
        from dogbreed.evaluation.breeds import analyze
        from dogbreed.report import describe, write_annotated
        from dogbreed.table import schema

        df = analyze([str(p) for p in images], cfg)
        for row in df.to_dict("records"):
            typer.echo(json.dumps({k: row[k] for k in schema.PREDICT_COLUMNS}, default=str) if as_json
                       else f"{row['path']}: {describe(row)}")
        if annotate:
            write_annotated(df, annotate, cfg.photos)


@app.command("evaluate")
def evaluate_command(
    folders: Annotated[list[str], typer.Argument(help="Labelled folders: breed subfolders, or folders named humans/ or other/.")],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    rotate: Annotated[float, typer.Option(min=-180, max=180, help="Also search faces on copies rotated by this many "
                                          "degrees, counter-clockwise (0 = not).")] = 0.0,
    detectors: Annotated[Optional[str], typer.Option(help="Compare these face detectors, comma-separated "
                                                     "(e.g. haar,yunet): faces found, false faces, images/s.")] = None,
) -> None:
    """Assess the detectors and the breed classifier on labelled photos, the way the dog-app did."""
    with _user_errors():
        cfg = _scan_config(config, model=model)
        from dogbreed.evaluation.breeds import assess
        from dogbreed.evaluation.faces import compare_detectors, detector_table, with_face_figures

        figures = assess(folders, cfg)
        names = [n.strip() for n in detectors.split(",") if n.strip()] if detectors else None
        compared = compare_detectors(folders, cfg, names, rotate) if names or rotate else []
        figures = with_face_figures(figures, compared, cfg.face.detector)
    if as_json:
        typer.echo(json.dumps({**figures, "detectors": [c.flat() for c in compared]} if names else figures, indent=2))
        return
    for key, value in figures.items():
        typer.echo(f"{key:>32}: {value:.1%}" if isinstance(value, float) and not key.endswith("_per_s")
                   else f"{key:>32}: {value}")
    if names:
        typer.echo("\n" + detector_table(compared, rotate))


OutArg = Annotated[str, typer.Argument(help="Scan output: a folder, s3://... or gs://... (a Delta table).")]


@app.command()
def latest(
    out_dir: OutArg,
    model_id: Annotated[Optional[str], typer.Option(help="Only rows of this model (default: any).")] = None,
    csv: Annotated[Optional[Path], typer.Option(help="Write the table as CSV here.")] = None,
    parquet: Annotated[Optional[Path], typer.Option(help="Write the table as Parquet here.")] = None,
) -> None:
    """The current answer per existing photo (latest successful-or-error row), as a table or file."""
    from dogbreed.table import readers, schema
    from dogbreed.table.output import Output

    with _user_errors():
        Output(out_dir).require()
        df = readers.latest(out_dir, model_id=model_id)
    if csv:
        df.to_csv(csv, index=False)
    if parquet:
        df.to_parquet(parquet, index=False)
    if not csv and not parquet:
        typer.echo(df[schema.SUMMARY_COLUMNS].to_string(index=False))
    typer.echo(f"{len(df)} photos; " + ", ".join(f"{k} {v}" for k, v in df["status"].value_counts().items()), err=True)


@app.command()
def compact(out_dir: OutArg, config: ConfigOpt = None, retention_hours: Annotated[Optional[int], typer.Option(
        min=1, help="Keep files older versions need this long (default: vacuum_retention_hours).")] = None,
        break_lock: BreakLockOpt = None) -> None:
    """Rewrite the table's small files into large ones (OPTIMIZE), then delete files no recent version needs (VACUUM)."""
    with _user_errors():
        from dogbreed.table.maintain import compact as run_compact

        cfg = _scan_config(config, vacuum_retention_hours=retention_hours, break_lock=break_lock)
        typer.echo(run_compact(out_dir, cfg.vacuum_retention_hours, cfg.lock_lease_s, cfg.break_lock).line())


@app.command()
def migrate(out_dir: Annotated[Path, typer.Argument(help="Output folder in the old runs/<run_id>/ layout.")],
            config: ConfigOpt = None, break_lock: BreakLockOpt = None) -> None:
    """Convert an output folder of runs/<run_id>/ + manifests into the Delta table, every row kept."""
    with _user_errors():
        from dogbreed.table.maintain import MIGRATED_DIR
        from dogbreed.table.maintain import migrate as run_migrate

        cfg = _scan_config(config, break_lock=break_lock)
        done = run_migrate(str(out_dir), cfg.lock_lease_s, cfg.break_lock)
    typer.echo(f"migrated {len(done)} runs into the Delta table {out_dir}; the old runs/ folder is now in "
               f"{out_dir / MIGRATED_DIR}: delete it once you have checked the table")


@app.command()
def report(
    out_dir: OutArg,
    html: Annotated[Path, typer.Option("--html", help="HTML file to write.")] = Path("report.html"),
    max_gallery: Annotated[int, typer.Option(min=0, help="Most photos in the gallery, taken in turn from each status.")] = 200,
    thumb_size: Annotated[int, typer.Option(min=32, help="Longest side of a gallery thumbnail, in pixels.")] = 320,
) -> None:
    """Write one self-contained HTML report of a scan: summary, breed chart, dog scores, annotated gallery, errors."""
    from dogbreed.report import build_report

    with _user_errors():
        path = build_report(out_dir, html, max_gallery=max_gallery, thumb_size=thumb_size)
    typer.echo(str(path))


@app.command()
def train(
    data: Annotated[Optional[str], typer.Argument(
        help="Labelled photos: breed subfolders, Stanford Images/, or dogImages/{train,valid,test}; default: the config's.")] = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Model artifact folder; checkpoints and results go beside it.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML config (see configs/train.yaml).")] = None,
    mode: Annotated[Optional[str], typer.Option(help="freeze, finetune or two-stage.")] = None,
    val: Annotated[Optional[str], typer.Option("--val", help="Separate labelled folder for model selection.")] = None,
    test: Annotated[Optional[str], typer.Option("--test", help="Separate labelled folder for the final test report.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs of the main stage.")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Ray Train workers (one GPU each with --gpu).")] = None,
    gpu: Annotated[Optional[bool], typer.Option("--gpu/--cpu", help="One GPU per worker (bf16, channels_last).")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray address to join; default: RAY_ADDRESS or a local Ray.")] = None,
) -> None:
    """Fine-tune a breed classifier with Ray Train; the same --out resumes a killed run."""
    with _user_errors():
        from dogbreed.train import fit, load_train_config

        cfg = load_train_config(config, {"data": data, "out": out, "mode": mode, "val_data": val, "test_data": test,
                                         "epochs": epochs, "num_workers": workers, "use_gpu": gpu, "address": address})
        setup_logging(None)
        result = fit(cfg)
    typer.echo(json.dumps({"model_id": result.model_id, "artifact": str(result.artifact_dir), **result.metrics}))


@app.command()
def bench(
    mode: Annotated[str, typer.Option(help="speed: classic loop vs. scan vs. stage bounds; gpu: the scan against its "
                                           "GPU/CPU decode and model bounds, with GPU and CPU use; archive: listing, "
                                           "memory and first result at 10k-1M files.")] = "speed",
    photos: Annotated[int, typer.Option(min=2, help="speed: the scan runs on N and on 3N photos; 60+ amortises Ray's fixed costs.")] = 60,
    classic: Annotated[int, typer.Option(min=1, help="speed: photos (of the N) for the slow classic dog-app loop.")] = 8,
    files: Annotated[str, typer.Option(help="archive: comma-separated archive sizes.")] = "2000,10000,100000,1000000",
    workdir: Annotated[Path, typer.Option(help="Generated photos are kept here and reused by the next run.")] = Path("/tmp/dogbreed-bench"),
    data: Annotated[Path, typer.Option(help="Real photos to build from (falls back to the bundled samples).")] = Path("../shared/data"),
    small: Annotated[bool, typer.Option("--small/--no-small", help="speed: also measure the original small photos.")] = True,
    config: ConfigOpt = None,
    model: ModelOpt = None,
) -> None:
    """Benchmarks: `--mode speed` or `--mode gpu` (12-MP and small photos), or `--mode archive` (10k to 1M files)."""
    with _user_errors():
        if mode == "archive":
            from dogbreed.bench.archive import format_report as archive_report
            from dogbreed.bench.archive import run_archive_benchmark

            sizes = [int(v.replace("_", "")) for v in files.split(",") if v.strip()]
            typer.echo(archive_report(run_archive_benchmark(workdir, sizes, data if data.is_dir() else None,
                                                            log=typer.echo)))
            return
        if mode not in ("speed", "gpu"):
            raise ConfigError(f"--mode {mode!r}: expected speed, gpu or archive")
        cfg = _scan_config(config, model=model)
        if mode == "gpu":
            from dogbreed.bench.gpu import format_gpu_report, run_gpu_benchmark
            from dogbreed.bench.photos import find_sources

            report = run_gpu_benchmark(workdir, cfg, n=photos, small=small, log=typer.echo,
                                       sources=find_sources(data if data.is_dir() else None, log=typer.echo))
            typer.echo(format_gpu_report(report))
            return
        from dogbreed.bench.photos import find_sources
        from dogbreed.bench.speed import format_report, run_benchmark

        report = run_benchmark(workdir, cfg, n=photos, classic_n=classic, small=small,
                               sources=find_sources(data if data.is_dir() else None, log=typer.echo))
    typer.echo(format_report(report))


AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray dashboard URL, e.g. http://HEAD:8265; default: RAY_ADDRESS.")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="scan or train; the arguments after it go to jobs/<job>.py.")],
    address: AddressOpt = None,
    config: ConfigOpt = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Stream the job's logs and exit as it did.")] = True,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds any one request to the cluster may take.")] = 30.0,
) -> None:
    """Run a job on a Ray cluster through its Jobs API; paths in the arguments must exist on the cluster's nodes."""
    from dogbreed.cluster.submit import submit as run_submit

    with _user_errors():
        result = run_submit(job, list(ctx.args), address=address, config=config, follow=follow, timeout_s=timeout)
    if follow:
        typer.echo(f"{result.job_id}: {result.status} {result.message}".rstrip(), err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def jobs(address: AddressOpt = None) -> None:
    """List the cluster's jobs, newest first."""
    from dogbreed.cluster.submit import list_jobs

    with _user_errors():
        rows = list_jobs(address)
    for r in rows:
        typer.echo(f"{r['job_id']:<44} {r['status']:<10} {r['started']:<20} {r['entrypoint']}")


@app.command()
def logs(job_id: Annotated[str, typer.Argument(help="Job id from `dogbreed jobs`.")], address: AddressOpt = None) -> None:
    """Print a job's logs so far."""
    from dogbreed.cluster.submit import job_logs

    with _user_errors():
        typer.echo(job_logs(job_id, address), nl=False)


@app.command()
def stop(job_id: Annotated[str, typer.Argument(help="Job id from `dogbreed jobs`.")], address: AddressOpt = None) -> None:
    """Stop a running job (its scan run is discarded; the output keeps its last committed run)."""
    from dogbreed.cluster.submit import stop_job

    with _user_errors():
        stopped = stop_job(job_id, address)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already ended'}")


def main() -> None:  # pragma: no cover - console entry point
    app()
