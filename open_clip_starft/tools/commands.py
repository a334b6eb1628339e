"""What every command line of the package shares: the one subcommand dispatch and old flag names kept
as warning aliases.

A command with subcommands (``open-clip-starft``, ``bench``, ``descriptors``) is a table
``{name: (target, help)}`` where ``target`` is a module name (imported only when chosen; it has
``main(argv) -> int``) or a function ``main(argv) -> int``; ``dispatch`` picks the subcommand, each
subcommand parses its own flags. ``--help`` lists the table; an unknown name is one line, exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Mapping, Union

Target = Union[str, Callable[[list], int]]


def usage(prog: str, table: Mapping[str, tuple[Target, str]], description: str = "") -> str:
    width = max(map(len, table))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in table.items()]
    head = f"usage: {prog} {{{','.join(table)}}} [args...]"
    return "\n\n".join(part for part in (head, description, "\n".join(lines)) if part) + \
        f"\n\n'{prog} SUBCOMMAND --help' shows a subcommand's flags."


def dispatch(prog: str, table: Mapping[str, tuple[Target, str]], argv=None, description: str = "") -> int:
    """Run the subcommand ``argv[0]`` of ``table`` with the rest of ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(prog, table, description))
        return 0
    if not argv or argv[0] not in table:
        print(usage(prog, table, description), file=sys.stderr)
        if argv:
            print(f"{prog}: error: unknown command {argv[0]!r}: use one of {', '.join(table)}", file=sys.stderr)
        return 2
    target = table[argv[0]][0]
    main = importlib.import_module(target).main if isinstance(target, str) else target
    return main(argv[1:])


def table_parser(prog: str, table: Mapping[str, tuple[Target, str]], description: str = "") -> argparse.ArgumentParser:
    """The subcommand table as an argparse parser (each subcommand parses its own flags; this one is for
    ``--help`` and for tools that read a command's structure)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(table) + "}")
    for name, (_, text) in table.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


class DeprecatedAlias(argparse.Action):
    """An old flag name kept for one release: stores into the new flag's ``dest`` (appending when the new
    flag appends) and warns once on stderr that the name changed."""

    def __init__(self, option_strings, dest, new: str, append: bool = False, **kwargs):
        self.new, self.append = new, append
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is now {self.new}", file=sys.stderr)
        if self.append:
            setattr(namespace, self.dest, [*(getattr(namespace, self.dest, None) or []), values])
        else:
            setattr(namespace, self.dest, values)


def add_alias(parser, old: str, new: str, dest: str, append: bool = False, **kwargs) -> None:
    """Accept ``old`` as a warning alias of the flag ``new`` (whose value lands in ``dest``)."""
    parser.add_argument(old, dest=dest, action=DeprecatedAlias, new=new, append=append, default=argparse.SUPPRESS,
                        **kwargs)
