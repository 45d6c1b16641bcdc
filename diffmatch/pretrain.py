"""``python -m diffmatch.pretrain``: the stand-in encoder (``diffmatch.lab.pretrain``)."""

import tyro

from diffmatch.cli import run_cli
from diffmatch.lab.pretrain import Args, pretrain

if __name__ == "__main__":
    run_cli(lambda: pretrain(tyro.cli(Args, prog="python -m diffmatch.pretrain")))
