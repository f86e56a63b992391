"""Commands that look at photos: scan (the batch job), predict, evaluate."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from dogbreed.cli.app import BreakLockOpt, ConfigOpt, ModelOpt, _scan_config, _user_errors, app
from dogbreed.console import native_stderr_quiet, printable, setup_logging, stop_on_sigterm
from dogbreed.errors import Exit


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
                    typer.echo(f"  {printable(path)}")
        typer.echo(summary.line())
        raise typer.Exit(Exit.OK)
    typer.echo(summary.line())
    raise typer.Exit(summary.exit_code)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Photo files (or s3:// / gs:// objects).")],
    model: ModelOpt = None,
    config: ConfigOpt = None,
    annotate: Annotated[Optional[Path], typer.Option(help="Write copies with the answer drawn on them here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per photo.")] = False,
) -> None:
    """Print the dog-app answer per photo: 'dog: <breed> (p)', 'human: looks like <breed> (p)' or 'neither'.
    Exit 3 when a photo could not be read (missing, not a photo): its line says why."""
    with _user_errors():
        cfg = _scan_config(config, model=model)
        from dogbreed.vision.codecs import check_plugins  # here: --help imports no Pillow

        check_plugins(cfg.photos.plugins)
        from dogbreed.evaluation.breeds import analyze
        from dogbreed.report import describe, write_annotated
        from dogbreed.table import schema

        df = analyze([str(p) for p in images], cfg)
        copies = write_annotated(df, annotate, cfg.photos) if annotate else {}
        for row in df.to_dict("records"):
            # pandas' NaN (no error, no breed) is null: NaN is no JSON, and strict parsers (node, jq's) refuse it
            shown = {k: None if isinstance(row[k], float) and row[k] != row[k] else row[k] for k in schema.PREDICT_COLUMNS}
            shown |= {"annotated": copies.get(row["path"])} if annotate else {}
            typer.echo(json.dumps(shown, default=str, allow_nan=False) if as_json
                       else f"{printable(row['path'])}: {describe(row)}")
        for path, copy in copies.items():  # a copy not named for its photo's stem alone is named here
            if copy.name != f"{Path(path).stem}.annotated.jpg":
                typer.echo(f"note: the annotated copy of {printable(path)} is {printable(str(copy))}", err=True)
    if (df["status"] == "error").any():  # as a scan with error rows: the answers stand, and a script can tell
        raise typer.Exit(Exit.BAD_PHOTOS)


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
    classes: Annotated[Optional[str], typer.Option(help="A taxonomy file (or dogapp133): the model's top-1/top-5 beside "
                                                   "zero-shot's, on breeds ImageNet has and lacks, and per breed.")] = None,
) -> None:
    """Assess the detectors and the breed classifier on labelled photos, the way the dog-app did.
    Breed folders that name none of the classes are left out of breed accuracy with a warning; exit 2 when a folder
    holds no photos, or (with --classes) no breed folder names a class."""
    setup_logging(None)  # warnings (folders left out) on stderr, one line each; the figures alone on stdout
    with _user_errors():
        cfg = _scan_config(config, model=model)
        from dogbreed.vision.codecs import check_plugins  # here: --help imports no Pillow

        check_plugins(cfg.photos.plugins)
        if classes:
            from dogbreed.evaluation.taxonomy import compare, format_comparison

            compared_classes = compare(folders, classes, cfg)
            typer.echo(json.dumps(compared_classes, indent=2) if as_json else format_comparison(compared_classes))
            return
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
