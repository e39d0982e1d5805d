"""Command line of the benchmark suite: `python bench/run.py ...` (same as `python -m bench ...`).
The flags and sections are in bench/cli.py (`--help`)."""
from __future__ import annotations

from pathlib import Path
import sys

if __name__ == "__main__":
    # run as a script: import the package from the repository root, not modules from bench/ itself
    here, root = Path(__file__).resolve().parent, Path(__file__).resolve().parents[1]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(root))
    from bench.cli import main
    sys.exit(main(prog="python bench/run.py"))
