"""Commands on a scan's output table: latest, report, compact, migrate, check, similar, relabel."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from dogbreed.cli.app import BreakLockOpt, ConfigOpt, ModelOpt, _scan_config, _user_errors, app
from dogbreed.config import ConfigError
from dogbreed.console import printable
from dogbreed.errors import replacing, report_target

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
        for path, suffix in ((csv, ".csv"), (parquet, ".parquet")):
            if path:
                report_target(path, (suffix,), out_dir)
        Output(out_dir).require()
        df = readers.latest(out_dir, model_id=model_id)
        for path, write in ((csv, df.to_csv), (parquet, df.to_parquet)):
            if path:
                with replacing(path) as tmp:
                    write(tmp, index=False)
    if df.empty:  # not pandas' "Empty DataFrame / Columns: [...] / Index: []" and "0 photos; "
        of_model = f" of model {model_id}" if model_id else ""
        typer.echo(f"0 photos: {out_dir} holds no current photo{of_model} (its scans found none, or every photo they "
                   "found was deleted since)", err=True)
        return
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
def check(out_dir: OutArg, repair: Annotated[bool, typer.Option(
        "--repair", help="Mend a damaged table: move damaged log commits aside, remove damaged files in a new "
        "version; the history stays.")] = False,
        deep: Annotated[bool, typer.Option("--deep", help="Read every page of every file, not only its footer.")] = False,
        config: ConfigOpt = None, break_lock: BreakLockOpt = None) -> None:
    """Verify a table: its log continuous and readable, every current data file present and readable."""
    from dogbreed.errors import Exit

    with _user_errors():
        from dogbreed.table.maintain import check as run_check

        cfg = _scan_config(config, break_lock=break_lock)
        found, done, after = run_check(out_dir, repair, deep, cfg.lock_lease_s, cfg.break_lock)
    for line in found.lines():
        typer.echo(line)
    if done:
        typer.echo("repaired:")
        for line in done:
            typer.echo(f"  {line}")
        typer.echo("afterwards:")
        for line in after.lines():
            typer.echo(line)
    if not after.ok:
        raise typer.Exit(Exit.FAILED)


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
def similar(
    out_dir: OutArg,
    queries: Annotated[list[str], typer.Argument(help="Paths already in the table, or any photo files.")],
    k: Annotated[int, typer.Option("--k", min=1, max=10_000, help="Nearest rows to print per query.")] = 20,
    status: Annotated[Optional[str], typer.Option(help="Only rows of this status (dog, human, dog_and_human, neither).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per query.")] = False,
    model: ModelOpt = None,
    config: ConfigOpt = None,
) -> None:
    """The current rows most like each query (cosine similarity of the stored embeddings): path, similarity, status, breed."""
    with _user_errors():
        from dogbreed.vectors.similar import similar as find

        if status is not None and status not in ("dog", "human", "dog_and_human", "neither"):
            raise ConfigError(f"--status {status!r}: expected dog, human, dog_and_human or neither")
        found = find(out_dir, queries, _scan_config(config, model=model), k=k, status=status)
    for f in found:
        if as_json:
            typer.echo(json.dumps({"query": f.query, "hits": [vars(h) for h in f.hits]}))
            continue
        typer.echo(f"{f.query}:")
        for h in f.hits:
            typer.echo(f"  {h.similarity:.3f}  {h.status:<13} {h.breed or '-':<28} {printable(h.path)}")


@app.command()
def relabel(
    out_dir: OutArg,
    model: Annotated[str, typer.Option("--model", "-m", help="A model on the backbone that made the stored vectors "
                                       "(a freeze-mode artifact of it, or 'default').")],
    config: ConfigOpt = None,
    break_lock: BreakLockOpt = None,
) -> None:
    """Re-decide every current row from its stored embedding with another model on the same backbone; one commit."""
    with _user_errors():
        from dogbreed.vectors.relabel import relabel as run_relabel

        cfg = _scan_config(config, model=model, break_lock=break_lock)
        summary = run_relabel(out_dir, cfg, cfg.break_lock)
    typer.echo(summary.line())
