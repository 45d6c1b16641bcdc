"""``python -m diffmatch.bench``: speed and the methods' comparison (``diffmatch.lab.bench``)."""

import tyro

from diffmatch.cli import run_cli
from diffmatch.lab.bench import Args, main

if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.bench")))
