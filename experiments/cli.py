"""What every Hydra command shares: our --help, the one-line error, the precheck before Hydra."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from experiments.compose import ConfigError, parse_overrides, split_command

HELP_FLAGS = {"-h", "--help"}  # ours; Hydra's own help stays at --hydra-help


def fail(prog: str, error: ConfigError | str) -> NoReturn:
    """One line on stderr (field, value, expectation) and exit code 2."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are the one line every command prints, not usage + line."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def run_command(prog: str, argv: list[str] | None, help_text: Callable[[], str],
                precheck: Callable[[list[str]], list[str]], run: Callable[[], None]) -> None:
    """Prints the help, or validates every run the command line asks for and hands the
    (possibly amended) command line to the Hydra app `run`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if HELP_FLAGS & set(argv):
        print(help_text())
        return
    try:
        parse_overrides(split_command(argv)[0])  # Hydra would print a traceback
        argv = precheck(argv)
    except ConfigError as error:
        fail(prog, error)
    sys.argv = [sys.argv[0], *argv]
    run()
