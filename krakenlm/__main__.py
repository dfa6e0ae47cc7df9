"""`python -m krakenlm` (what torchrun runs: `torchrun --nproc-per-node 2 -m krakenlm generate --tp 2 ...`)."""

import sys


def run() -> int:
    """The CLI, with a Ctrl-C during its start (importing torch takes seconds) ending as quietly as later."""
    try:
        from krakenlm.cli import main
    except KeyboardInterrupt:
        from krakenlm.errors import exit_interrupted

        exit_interrupted()
    return main()


if __name__ == "__main__":
    sys.exit(run())
