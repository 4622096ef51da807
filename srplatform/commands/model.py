"""`c2d model`: placeholder until issue 3 lands."""

from srplatform.commands import not_available

HELP = "Model information: parameters and MACs for any architecture config [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 3); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("model", "issue 3")
