"""``python -m diffmatch.demo``: the CPU-sized end-to-end demonstration (``diffmatch.lab.demo``)."""

import tyro

from diffmatch.cli import run_cli
from diffmatch.lab.demo import Args, main

if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.demo")))
