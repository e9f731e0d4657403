"""MkDocs hook: the command line page shows every command's ``--help`` as the parser prints it."""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- CLI HELP -->"


def command_help() -> str:
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal width: a fixed one keeps builds equal
    from surrogate_cert.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    parts = []
    for name, command in sub.choices.items():
        text = command.format_help().replace("```", "'''")
        parts.append(f"### `surrogate-cert {name}`\n\n```text\n{text}```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 - MkDocs hook signature
    if MARKER in markdown:
        return markdown.replace(MARKER, command_help())
    return markdown
