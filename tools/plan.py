#!/usr/bin/env python3
"""Plan an M2-Encoder training layout without hardware (see ``m2-plan --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.cli.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
