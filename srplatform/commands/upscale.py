"""`c2d upscale`: placeholder until issue 7 lands."""

from srplatform.commands import not_available

HELP = "Upscale an image or a folder with a registered model or checkpoint [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 7); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("upscale", "issue 7")
