"""`python -m bench ...`: the benchmark suite's command line (bench/cli.py)."""
import sys

from bench.cli import main

sys.exit(main(prog="python -m bench"))
