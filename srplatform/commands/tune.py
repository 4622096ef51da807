"""`c2d tune`: placeholder until issue 6 lands."""

from srplatform.commands import not_available

HELP = "Search hierarchical-encoding hyperparameters with Ray Tune [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 6); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("tune", "issue 6")
