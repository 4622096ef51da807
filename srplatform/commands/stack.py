"""`c2d stack`: placeholder until issue 2 lands."""

from srplatform.commands import not_available

HELP = "Start, stop and inspect the embedded local stack (MLflow server, S3 endpoint) [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 2); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("stack", "issue 2")
