"""
A ``cli-help`` directive: the help of a command-line parser and of each of its subcommands,
taken from the parser itself when the docs are built, so that the reference cannot drift.

    ```{cli-help} vmcontroller.cli:parser
    ```
"""

from __future__ import annotations

import argparse
import importlib
import os

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:  # argparse keeps them nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((name, sub))
                found.extend((f"{name} {n}", s) for n, s in _subparsers(sub))
    return found


class CliHelp(SphinxDirective):
    required_arguments = 1

    def run(self) -> list[nodes.Node]:
        module, _, function = self.arguments[0].partition(":")
        parser: argparse.ArgumentParser = getattr(importlib.import_module(module), function)()
        os.environ["COLUMNS"] = "100"  # the same wrapping wherever the docs are built
        result: list[nodes.Node] = [nodes.literal_block(text=parser.format_help())]
        for name, sub in _subparsers(parser):
            section = nodes.section(ids=[nodes.make_id(f"{parser.prog} {name}")])
            section += nodes.title(text=f"{parser.prog} {name}")
            section += nodes.literal_block(text=sub.format_help())
            result.append(section)
        return result


def setup(app: Sphinx) -> dict[str, bool]:
    app.add_directive("cli-help", CliHelp)
    return {"parallel_read_safe": True}
