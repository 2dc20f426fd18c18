"""(being written)"""


def register(app, ctx):
    pass
