#!/usr/bin/env python3
"""Image–caption collections → megatron-core indexed datasets (see ``m2-preprocess --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.cli.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
