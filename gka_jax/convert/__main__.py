"""``python -m gka_jax.convert SRC DST ...`` is ``gka-jax convert SRC DST ...``."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
