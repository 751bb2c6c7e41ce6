#!/usr/bin/env python3
"""Concatenate image–text indexed datasets (see ``m2-merge-datasets --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.cli.merge_datasets import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
