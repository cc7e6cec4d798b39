"""`bmc`: the command-line entry point. Heavy modules are imported inside the commands that need them."""

from __future__ import annotations

import logging
import sys

import typer

from bmc import __version__

app = typer.Typer(
    name="bmc",
    help="Train, compress, export, benchmark and serve PyTorch models for the edge.",
    add_completion=False,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False
# What `pip install bmc` (the edge install) leaves out and `bmc[full]` brings: train, export and
# compress need these; bench, serve, info and sign do not.
FULL_INSTALL_MODULES = ("torch", "torchvision", "torch_pruning", "safetensors", "sklearn")


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(usage errors, aborts) of the click typer runs on: its vendored copy (typer >= 0.22) or click."""
    usage: list[type] = []
    aborts: list[type] = [typer.Abort]
    try:
        from typer._click import exceptions as vendored

        usage.append(vendored.UsageError)
    except ImportError:
        pass
    try:
        import click

        usage.append(click.exceptions.UsageError)
        aborts.append(click.exceptions.Abort)
    except ImportError:
        pass
    return tuple(usage), tuple(aborts)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bmc {__version__}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors."),
) -> None:
    global _debug
    _debug = debug
    if ctx.invoked_subcommand is None:
        typer.echo(ctx.get_help())


def _register_commands() -> None:
    from bmc.cli import bench, compress, export, info, serve, sign, train

    train.register(app)
    compress.register(app)
    export.register(app)
    bench.register(app)
    serve.register(app)
    sign.register(app)
    info.register(app)


def _configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    logger = logging.getLogger("bmc")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logging.addLevelName(logging.WARNING, "warning")
    logging.addLevelName(logging.INFO, "info")


def _fail(message: str, exit_code: int) -> int:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    typer.echo(f"error: {first_line}", err=True)
    return exit_code


def _missing_module_message(exc: ModuleNotFoundError, argv: list[str]) -> str:
    if (exc.name or "").split(".")[0] in FULL_INSTALL_MODULES:
        command = next((arg for arg in argv if not arg.startswith("-")), "this command")
        return f"`bmc {command}` needs {exc.name}, which the edge install leaves out: pip install 'bmc[full]'"
    return f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns (and exits with) 0 on success, 2 on usage errors, 1 on runtime errors."""
    from bmc.errors import BmcError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    _configure_logging()
    _register_commands()
    usage_errors, aborts = _click_exception_types()
    try:
        code = app(args=argv, prog_name="bmc", standalone_mode=False)
        code = code if isinstance(code, int) else 0
    except usage_errors as exc:
        hint = f" (see `bmc {exc.ctx.info_name} --help`)" if exc.ctx and exc.ctx.parent else " (see `bmc --help`)"
        code = _fail(exc.format_message() + hint, 2)
    except aborts:
        code = _fail("aborted", 130)
    except KeyboardInterrupt:
        code = _fail("interrupted", 130)
    except BmcError as exc:
        if debug:
            raise
        code = _fail(str(exc), exc.exit_code)
    except ModuleNotFoundError as exc:
        if debug:
            raise
        code = _fail(_missing_module_message(exc, argv), 1)
    except OSError as exc:
        if debug:
            raise
        # A path given that cannot be read or written (a file where a directory should be, /proc,
        # no permission): the system's own words, after the path.
        code = _fail(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else f"{type(exc).__name__}: {exc}", 1)
    except MemoryError:
        if debug:
            raise
        code = _fail("out of memory (rerun with --debug for the traceback)", 1)
    except Exception as exc:  # the last line of defence: still one line, unless --debug
        if debug:
            raise
        code = _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)
    sys.exit(code)
