"""``python -m diffmatch.synthetic``: write the procedural data set (see ``diffmatch.synthetic``)."""

import tyro

from diffmatch.files import run_cli
from diffmatch.synthetic import Args, main

run_cli(lambda: main(tyro.cli(Args, prog="python -m diffmatch.synthetic")))
