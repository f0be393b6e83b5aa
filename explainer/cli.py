"""The command line: options in, library calls out, every user error as one line on stderr.

Keep commands thin. Work belongs in the library modules so that it can be called from Python
and tested without a shell.
"""

from __future__ import annotations

import click

from explainer.errors import UserError


class _OneLineErrors:
    """Mixin for click commands: a UserError becomes `Error: ...` and exit code 1, no traceback,
    unless --debug is given."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            if (ctx.find_root().params or {}).get("debug"):
                raise
            raise click.ClickException(str(exc)) from None


class Command(_OneLineErrors, click.Command):
    pass


class Group(_OneLineErrors, click.Group):
    command_class = Command


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="llama-explainer")
def main(debug: bool):
    """Explain source code piece by piece with an LLM, publish the walkthrough as Jekyll posts,
    and translate it without ever touching the code."""


def explain_main():
    """The `explain` console script: `explain FILE ...` is `explainer explain FILE ...`."""
    main.commands["explain"].main(prog_name="explain")
