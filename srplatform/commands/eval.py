"""`c2d eval`: placeholder until issue 8 lands."""

from srplatform.commands import not_available

HELP = "PSNR/SSIM on benchmark folders with the published convention [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 8); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("eval", "issue 8")
