"""`c2d finetune`: placeholder until issue 5 lands."""

from srplatform.commands import not_available

HELP = "Stage 2: discrete-scale fine-tuning per scale, fanned out on Ray Train [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 5); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("finetune", "issue 5")
