"""`c2d pretrain`: placeholder until issue 5 lands."""

from srplatform.commands import not_available

HELP = "Stage 1: continuous-scale pretraining on Ray Train [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 5); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("pretrain", "issue 5")
