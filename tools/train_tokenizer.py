#!/usr/bin/env python3
"""Train a bilingual SentencePiece tokenizer (see ``m2-train-tokenizer --help``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_m2.cli.train_tokenizer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
