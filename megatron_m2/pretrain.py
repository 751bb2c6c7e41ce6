"""Pretrain M2-Encoder with TP x PP x DP on megatron-core.

CPU (gloo), two processes, tensor parallel 2, synthetic fixed batch::

    torchrun --nproc-per-node 2 -m megatron_m2.pretrain --flavor tiny \
        --tensor-model-parallel-size 2 --train-iters 100 --synthetic

One GPU node (8 GPUs), 0.4B, TP=2, DP=4::

    torchrun --nproc-per-node 8 -m megatron_m2.pretrain --flavor 0.4b \
        --tensor-model-parallel-size 2 --micro-batch-size 64 --global-batch-size 2048 --bf16 ...

``m2-pretrain --help`` lists every flag by group. This module is an alias of the console script
(:mod:`megatron_m2.cli.pretrain`), kept for ``torchrun -m`` and the Slurm recipes.
"""

import sys

from megatron_m2.cli.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
