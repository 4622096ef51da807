"""`c2d data`: placeholder until issue 4 lands."""

from srplatform.commands import not_available

HELP = "Pack images into WebDataset shards in object storage; inspect shards [not implemented yet]"
DESCRIPTION = HELP + "\n\nThis command is not implemented yet (issue 4); it exits with status 3."


def configure(parser):
    pass


def run(args):
    return not_available("data", "issue 4")
