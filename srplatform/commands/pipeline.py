"""`c2d pipeline`: placeholder until issue 5 lands."""

from srplatform.commands import not_available

HELP = "Both stages in one job: continuous pretraining, then discrete fan-out [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 5); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("pipeline", "issue 5")
