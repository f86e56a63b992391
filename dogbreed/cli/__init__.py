"""The one typer app (`dogbreed ...`): the app and its shared options are in app.py, the commands beside it."""
# isort: skip_file  (the import order is the order `dogbreed --help` lists the commands in)

from dogbreed.cli import cluster, scanning, tables, training  # noqa: F401 - each registers its commands on the app
from dogbreed.cli.app import app

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    app()
