"""The recipe's command line: HfArgumentParser over the recipe's dataclasses, laid out for someone reading it first.

`--help` shows a one-line usage, then one group per dataclass in the order given (the recipe's own flags before
the TrainingArguments), each flag once: its snake_case name (the dashed spelling is accepted too), a short
metavar, its help and its default said once. `fail` is argparse's way out: a one-line error, exit code 2."""
from __future__ import annotations

import argparse
from typing import NoReturn, Sequence

from transformers import HfArgumentParser

USAGE = "%(prog)s [--flag value ...]  or  %(prog)s FLAGS.json|FLAGS.yaml  (--help lists every flag)"
MAX_CHOICES_METAVAR = 60  # longer {a,b,...} lists (e.g. --optim) show as NAME, with the choices in the help


def _metavar(action: argparse.Action) -> str:
    if action.choices is not None:
        braces = "{" + ",".join(map(str, action.choices)) + "}"
        return braces if len(braces) <= MAX_CHOICES_METAVAR else "NAME"
    if getattr(action.type, "__name__", "") == "string_to_bool":  # HfArgumentParser's bool flags
        return "BOOL"
    return {int: "N", float: "X"}.get(action.type, "TEXT")


class RecipeHelpFormatter(argparse.HelpFormatter):
    """One option name per flag and its default said once (HF's default formatter appends "(default: ...)" to
    help texts that already name their default, and gives the `--no_<flag>` twins a wrong "(default: False)")."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            return super()._format_action_invocation(action)
        name = action.option_strings[0]
        return name if action.nargs == 0 else f"{name} {self._format_args(action, action.metavar)}"

    def _get_help_string(self, action: argparse.Action) -> str:
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_<flag> twin of a bool flag
            return f"Same as --{action.dest} false."
        text = action.help or ""
        if action.choices is not None and action.metavar == "NAME":
            text += " One of: " + ", ".join(map(str, action.choices)) + "."
        if action.default in (None, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return text + " (default: %(default)s)"


def build_parser(groups: Sequence[tuple[type, str, str]], description: str) -> HfArgumentParser:
    """An HfArgumentParser over `groups` = [(dataclass, title, description)], their flags grouped in that order."""
    for cls, title, _ in groups:
        cls._argument_group_name = title  # HfArgumentParser gives a dataclass with this attribute its own group
    parser = HfArgumentParser([cls for cls, _, _ in groups], usage=USAGE, description=description,
                              formatter_class=RecipeHelpFormatter)
    described = {title: text for _, title, text in groups}
    for group in parser._action_groups:
        group.description = described.get(group.title, group.description)
    for action in parser._actions:
        if action.option_strings and action.nargs != 0 and action.metavar is None:
            action.metavar = _metavar(action)
    return parser


def promote(parser: argparse.ArgumentParser, from_title: str, dests: Sequence[str], title: str,
            description: str) -> None:
    """Move the flags `dests` of group `from_title` into a new group shown just before it."""
    source = next(g for g in parser._action_groups if g.title == from_title)
    group = parser.add_argument_group(title, description)
    group._group_actions.extend(a for a in source._group_actions if a.dest in dests)
    source._group_actions[:] = [a for a in source._group_actions if a.dest not in dests]
    parser._action_groups.remove(group)
    parser._action_groups.insert(parser._action_groups.index(source), group)


def fail(parser: argparse.ArgumentParser, error: Exception) -> NoReturn:
    """argparse's error exit for a flag that parsed but is wrong: usage, one line naming it, exit code 2."""
    parser.error(" ".join(str(error).split()))
