"""`c2d jobs`: placeholder until issue 7 lands."""

from srplatform.commands import not_available

HELP = "List, inspect, follow and stop submitted Ray jobs [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 7); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("jobs", "issue 7")
