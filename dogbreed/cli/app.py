"""The one typer app and what its commands share: options, config loading, and turning errors into one sentence.

The commands live beside this module (scanning, tables, training, cluster), grouped by what they work on; each
loads the config and calls one library function."""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from dogbreed.config import ScanConfig, load_config
from dogbreed.console import Terminated
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
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:  # only a name the user gave, or one made from it, can be too long
            name = os.fsdecode(e.filename or "")
            raise _fail(Exit.USAGE, "error", f"{name if len(name) <= 120 else name[:60] + '…' + name[-40:]}: a name "
                        "too long for the file system (at most 255 bytes a name, 4,096 a path)") from None
        _log_bug(e)
        raise
    except Exception as e:
        _log_bug(e)
        raise  # a real bug: its traceback


def _log_bug(e: Exception) -> None:
    """A real bug keeps its traceback on the terminal; its one-line summary goes to the log file (exit 1)."""
    logging.getLogger("dogbreed").info("failed (exit %d): %s: %s", Exit.FAILED, type(e).__name__,
                                       _one_line(str(e).splitlines()[0]) if str(e) else "")


def _scan_config(config: Path | None, **overrides) -> ScanConfig:
    return load_config(ScanConfig, config, overrides)
