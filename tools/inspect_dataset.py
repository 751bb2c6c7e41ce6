#!/usr/bin/env python3
"""Statistics and a contact sheet of an image–text indexed dataset (``m2-inspect-dataset -h``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.cli.inspect_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
