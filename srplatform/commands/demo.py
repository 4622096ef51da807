"""`c2d demo`: placeholder until issue 8 lands."""

from srplatform.commands import not_available

HELP = "The end-to-end main job on the embedded stack [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 8); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("demo", "issue 8")
