"""The ``kvcodec`` command line.

Each sub-package contributes its own commands through a ``register(subparsers)``
function; this module only dispatches and maps errors to exit codes:

    0  success
    1  bad or corrupt data, a failed check, a missing entry
    2  usage error (bad option, missing file, unknown level)

``main(argv)`` returns the exit code instead of exiting so tests can call it
in-process.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

EXIT_OK = 0
EXIT_DATA = 1
EXIT_USAGE = 2

# Sub-packages that add commands. A module that fails to import (an optional
# extra not installed) simply contributes no commands.
COMMAND_MODULES = (
    "kvcodec.codec.cli",
    "kvcodec.client.model_cli",
    "kvcodec.client.calibrate",
    "kvcodec.store.cli",
    "kvcodec.service.cli",
    "kvcodec.client.cli",
)


class UsageError(Exception):
    """A command was called wrongly (missing file, bad value): exit code 2."""


class DataError(Exception):
    """A command met bad data or a failed check not raised as a library error: exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvcodec",
        description=(
            "Compress, store and serve LLM KV caches. "
            "Run 'kvcodec COMMAND --help' for each command."
        ),
    )
    from kvcodec import __version__

    parser.add_argument("--version", action="version", version=f"kvcodec {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.register(sub)
    return parser


def _library_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [DataError]
    from kvcodec.codec.errors import KVCodecError

    errors.append(KVCodecError)
    try:
        from kvcodec.store.errors import StoreError

        errors.append(StoreError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    data_errors = _library_errors()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"kvcodec: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except data_errors as exc:
        print(f"kvcodec: error: {exc}", file=sys.stderr)
        return EXIT_DATA
    except KeyboardInterrupt:
        print("kvcodec: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help / --version
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
