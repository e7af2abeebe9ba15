"""What every verb's command line shares: its parser (help text with defaults and an
example), the model argument (positional or ``-m``; the embedded model by default)."""
from __future__ import annotations

import argparse
import re

from edge_reft.errors import ReftError


class _Help(argparse.RawDescriptionHelpFormatter):
    """Docstrings as plain text (no ``literal`` backticks) and each flag's default shown,
    unless its help already states one or it has none worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, [], (), argparse.SUPPRESS, "")
        if shown and "default" not in text and action.option_strings:
            value = ",".join(map(str, action.default)) if isinstance(action.default, tuple) else action.default
            text = f"{text} (default: {value})" if text else f"default: {value}"
        return text


def layer_list(text: str) -> tuple[int, ...]:
    """An argparse type: block indices like 15 or 8,15,22."""
    try:
        out = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or min(out) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected block indices like 15 or 8,15,22")
    return out


def plain(doc: str) -> str:
    return re.sub(r"``([^`]*)``", r"\1", re.sub(r"(?<!`)`([^`]+)`(?!`)", r"\1", doc or ""))


def verb_parser(verb: str, doc: str | None, example: str) -> argparse.ArgumentParser:
    """A verb's parser: ``doc`` as its description, ``example`` under the options."""
    return argparse.ArgumentParser(prog=f"edge-reft {verb}", description=plain(doc or ""),
                                   epilog=f"example:\n  {example}", formatter_class=_Help)


def add_model(ap: argparse.ArgumentParser, help: str, name: str = "model") -> None:
    """The model: positional or ``-m/--model`` (as llama.cpp's tools take it)."""
    ap.add_argument(name, nargs="?", help=f"{help}; default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("-m", "--model", dest="model_flag", metavar="MODEL", help=f"the same as {name.upper()}")


def model_of(a: argparse.Namespace, name: str = "model") -> str:
    """The model a verb was given (positional or ``-m``), else the embedded one."""
    pos, flag = getattr(a, name), a.model_flag
    if pos and flag and pos != flag:
        raise ReftError(f"two models given: {pos} and -m {flag}; give one")
    if pos or flag:
        return pos or flag
    from edge_reft.models import default_model
    return str(default_model())
