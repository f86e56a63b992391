"""Commands that run jobs on a Ray cluster: submit, jobs, logs, stop."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from dogbreed.cli.app import ConfigOpt, _user_errors, app

AddressOpt = Annotated[Optional[str], typer.Option("--address", help="Ray dashboard URL, e.g. http://HEAD:8265; default: RAY_ADDRESS.")]
TimeoutOpt = Annotated[float, typer.Option(min=0.1, help="Seconds any one request to the cluster may take, whole (connecting "
                                                        "and reading all of the answer).")]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="scan or train; the arguments after it go to jobs/<job>.py.")],
    address: AddressOpt = None,
    config: ConfigOpt = None,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", help="Stream the job's logs and exit as it did.")] = True,
    timeout: TimeoutOpt = 30.0,
) -> None:
    """Run a job on a Ray cluster through its Jobs API; paths in the arguments must exist on the cluster's nodes."""
    from dogbreed.cluster.submit import submit as run_submit

    with _user_errors():
        result = run_submit(job, list(ctx.args), address=address, config=config, follow=follow, timeout_s=timeout)
    if follow:
        typer.echo(f"{result.job_id}: {result.status} {result.message}".rstrip(), err=True)
    raise typer.Exit(result.exit_code)


@app.command()
def jobs(address: AddressOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """List the cluster's jobs, newest first."""
    from dogbreed.cluster.submit import list_jobs

    with _user_errors():
        rows = list_jobs(address, timeout_s=timeout)
    for r in rows:
        typer.echo(f"{r['job_id']:<44} {r['status']:<10} {r['started']:<20} {r['entrypoint']}")


@app.command()
def logs(job_id: Annotated[str, typer.Argument(help="Job id from `dogbreed jobs`.")], address: AddressOpt = None,
         timeout: TimeoutOpt = 30.0) -> None:
    """Print a job's logs so far."""
    from dogbreed.cluster.submit import job_logs

    with _user_errors():
        typer.echo(job_logs(job_id, address, timeout_s=timeout), nl=False)


@app.command()
def stop(job_id: Annotated[str, typer.Argument(help="Job id from `dogbreed jobs`.")], address: AddressOpt = None,
         timeout: TimeoutOpt = 30.0) -> None:
    """Stop a running job (its scan run is discarded; the output keeps its last committed run)."""
    from dogbreed.cluster.submit import stop_job

    with _user_errors():
        stopped = stop_job(job_id, address, timeout_s=timeout)
    typer.echo(f"{job_id}: {'stop requested' if stopped else 'already ended'}")
