"""``python -m diffmatch.synthetic``: the procedural data set (``diffmatch.lab.synthetic``)."""

import tyro

from diffmatch.cli import run_cli
from diffmatch.lab.synthetic import Args, main

if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.synthetic")))
