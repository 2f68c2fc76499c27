"""The ``facestage`` console script.

Subcommands register themselves on one top-level parser: each entry of
:data:`SUBCOMMANDS` is a function that adds its parsers to the subparsers object and sets
``handler`` (a function of the parsed arguments returning an exit code) on each leaf. The
orchestrator adds its commands (``swap``, ``serve``, ``up``) from
``orchestrator.cli.register_commands`` when that module exists, so this module never
imports the orchestrator's dependencies for ``facestage models``.

Exit codes: 0 success, 1 a facestage error (one line on stderr), 2 a usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeAlias, cast

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from facestage import manifest
from facestage.errors import FacestageError
from facestage.manifest import ModelSpec

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
Registrar: TypeAlias = Callable[["Subparsers"], None]
Handler: TypeAlias = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PLUGIN_MODULES: tuple[str, ...] = ("orchestrator.cli",)
"""Modules whose ``register_commands(subparsers)`` adds commands, when installed."""


class UsageError(Exception):
    """A command line that parses but makes no sense (an unknown model name, say)."""


def _stdout_console() -> Console:
    # Piped output (tests, scripts, CI logs) gets a wide table instead of rich's default
    # 80 columns, which would fold model names.
    return Console(width=None if sys.stdout.isatty() else 160)


def _specs_named(names: Sequence[str], pull_all: bool) -> list[ModelSpec]:
    if pull_all:
        return list(manifest.MANIFEST.values())
    if not names:
        raise UsageError("name at least one model, or pass --all")
    specs = []
    for name in names:
        spec = manifest.find_spec(name)
        if spec is None:
            known = ", ".join(manifest.model_names())
            raise UsageError(f"unknown model {name!r} (known: {known})")
        specs.append(spec)
    return specs


def _cache_dir(args: argparse.Namespace) -> Path | None:
    return Path(args.cache_dir).expanduser() if args.cache_dir else None


def _format_size(size_bytes: int) -> str:
    return f"{size_bytes / 1e6:,.1f} MB" if size_bytes >= 1e6 else f"{size_bytes / 1e3:,.1f} kB"


def cmd_models_list(args: argparse.Namespace) -> int:
    """Prints the manifest as a table, with which models are already in the cache."""
    from facestage.model_store import cache_path

    cache_dir = _cache_dir(args)
    table = Table(title="facestage models")
    table.add_column("name", no_wrap=True)
    table.add_column("stage")
    table.add_column("family")
    table.add_column("size", justify="right")
    table.add_column("licence")
    table.add_column("sha256 pinned")
    table.add_column("in cache")
    for spec in manifest.MANIFEST.values():
        present = cache_path(spec, cache_dir).is_file()
        table.add_row(
            spec.name,
            spec.stage,
            spec.family,
            _format_size(spec.size_bytes),
            spec.licence,
            "yes" if spec.pinned else "no",
            "yes" if present else "no",
        )
    _stdout_console().print(table)
    return EXIT_OK


def cmd_models_pull(args: argparse.Namespace) -> int:
    """Downloads and verifies the named models; exit code 1 if any of them failed."""
    from facestage.model_store import pull

    specs = _specs_named(args.names, args.all)
    out = _stdout_console()
    err = Console(stderr=True)
    failed = 0
    for spec in specs:
        try:
            result = pull(
                spec,
                _cache_dir(args),
                progress=not args.no_progress,
                allow_unpinned=args.allow_unpinned,
                console=err,
            )
        except FacestageError as exc:
            err.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            failed += 1
            continue
        state = "downloaded" if result.downloaded else "already present"
        if result.verified:
            out.print(
                f"{spec.name}: {state}, sha256 verified -> {result.path}",
                highlight=False,
                soft_wrap=True,
            )
        else:
            err.print(
                f"[yellow]warning:[/] {escape(spec.name)} has no pinned sha256: "
                f"{escape(str(result.path))} is NOT verified "
                f"(sha256 {result.sha256}, size checked only)",
                highlight=False,
                soft_wrap=True,
            )
    return EXIT_ERROR if failed else EXIT_OK


def cmd_models_path(args: argparse.Namespace) -> int:
    """Prints where the cache keeps a model, pulled or not."""
    from facestage.model_store import cache_path

    (spec,) = _specs_named([args.name], pull_all=False)
    print(cache_path(spec, _cache_dir(args)))
    return EXIT_OK


def cmd_models_fixtures(args: argparse.Namespace) -> int:
    """Writes the contract fixtures (small ONNX graphs with the production contracts)."""
    try:
        fixtures = importlib.import_module("facestage.fixtures")
    except ImportError as exc:
        raise FacestageError(
            f"contract fixtures are unavailable ({exc}); install them with: "
            "pip install 'facestage[fixtures]'"
        ) from exc
    write = cast(Callable[[Path], dict[str, Path]], fixtures.write_contract_fixtures)
    written = write(Path(args.output).expanduser())
    for name, path in sorted(written.items()):
        print(f"{name}: {path}")
    return EXIT_OK


def _add_cache_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        help="model cache directory (default: $FACESTAGE_MODEL_DIR or ~/.cache/facestage/models)",
    )


def register_models_commands(subparsers: Subparsers) -> None:
    """Adds ``facestage models list|pull|path|fixtures``."""
    models = subparsers.add_parser("models", help="list, download and locate model files")
    models_sub = models.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    listing = models_sub.add_parser("list", help="show every supported model")
    _add_cache_dir(listing)
    listing.set_defaults(handler=cmd_models_list)

    pull = models_sub.add_parser("pull", help="download and verify models into the cache")
    pull.add_argument("names", nargs="*", metavar="NAME", help="model names (see models list)")
    pull.add_argument("--all", action="store_true", help="pull every model of the manifest")
    pull.add_argument(
        "--allow-unpinned",
        action="store_true",
        help="also fetch models without a pinned sha256 (checked by size only)",
    )
    pull.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_cache_dir(pull)
    pull.set_defaults(handler=cmd_models_pull)

    path = models_sub.add_parser("path", help="print the cache path of a model")
    path.add_argument("name", metavar="NAME")
    _add_cache_dir(path)
    path.set_defaults(handler=cmd_models_path)

    fixtures = models_sub.add_parser("fixtures", help="write the contract fixture models")
    fixtures.add_argument("--output", required=True, metavar="DIR", help="output directory")
    fixtures.set_defaults(handler=cmd_models_fixtures)


SUBCOMMANDS: list[tuple[str, Registrar]] = [("models", register_models_commands)]
"""Built-in command groups, in help order. Append here to add a group to facestage."""


def _plugin_registrars() -> list[Registrar]:
    registrars = []
    for module_name in PLUGIN_MODULES:
        try:
            found = module_name in sys.modules or importlib.util.find_spec(module_name) is not None
        except ModuleNotFoundError:  # the parent package is not installed
            found = False
        if found:
            module = importlib.import_module(module_name)
            registrars.append(cast(Registrar, module.register_commands))
    return registrars


def build_parser() -> argparse.ArgumentParser:
    """The full ``facestage`` parser: built-in groups, then installed plugins."""
    parser = argparse.ArgumentParser(
        prog="facestage", description="Face swapping as a platform service."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, register in SUBCOMMANDS:
        register(subparsers)
    for register in _plugin_registrars():
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``facestage`` with ``argv`` (default: the process arguments); returns the exit code."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "pass_through", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        # Commands whose flags belong to a settings class (serve) take the rest as is.
        if getattr(args, "pass_through", False):
            args.settings = [*getattr(args, "settings", []), *extra]
    except SystemExit as exc:  # argparse exits on --help (0) and on usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    handler = cast(Handler, args.handler)
    try:
        return handler(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FacestageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
