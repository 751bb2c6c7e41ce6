#!/usr/bin/env python3
"""Convert M2-Encoder checkpoints: official ↔ ours ↔ single file (see ``--help``).

The same command as the ``m2-convert`` console script; the implementation is
:mod:`megatron_m2.checkpoint`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.cli.convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
