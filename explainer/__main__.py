"""`python -m explainer ...` is the `explainer` command."""

from explainer.cli import main

main(prog_name="explainer")
