"""What every job's command line shares: help that states each default once."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default,
    or there is none to state (required options, flags, "decided at run time" Nones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default == "" or action.default is argparse.SUPPRESS
        if ("default" in text or action.required or nothing or action.nargs == 0):  # nargs 0: a flag
            return text
        return super()._get_help_string(action)
