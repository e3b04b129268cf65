"""`python -m magicdec` (also what `torchrun -m magicdec` runs)."""

import sys

from magicdec.cli.main import main

sys.exit(main())
