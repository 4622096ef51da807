"""`c2d submit`: placeholder until issue 7 lands."""

from srplatform.commands import not_available

HELP = "Submit a job to a Ray cluster through the Ray Jobs API [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 7); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("submit", "issue 7")
