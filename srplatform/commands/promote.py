"""`c2d promote`: placeholder until issue 7 lands."""

from srplatform.commands import not_available

HELP = "Re-evaluate and promote a registered model version (MLflow aliases) [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 7); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("promote", "issue 7")
