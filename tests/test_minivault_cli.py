"""The command line's help (`python minivault.py --help`): what the README's table quotes."""

from __future__ import annotations

import re

from minivault import build_parser


def test_help_states_each_default_once():
    # Flags whose default is computed at start (None here) say it in words; argparse
    # must not add a second, wrong "(default: None)" after them.
    text = build_parser().format_help()
    assert "(default: None)" not in text
    for flag in ("--queue-size", "--max-batch", "--allowed-hosts", "--model"):
        action = next(a for a in build_parser()._actions if flag in a.option_strings)
        assert action.help and "default" in action.help
    flat = re.sub(r"\s+", " ", text)
    assert "(default: 64, or --max-batch if larger)" in flat
    assert "(default: 3000)" in flat  # plain defaults are still shown


def test_every_flag_has_help_and_shows_its_default():
    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
