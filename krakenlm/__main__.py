"""`python -m krakenlm` (what torchrun runs: `torchrun --nproc-per-node 2 -m krakenlm generate --tp 2 ...`)."""

import sys

from krakenlm.cli import main

sys.exit(main())
