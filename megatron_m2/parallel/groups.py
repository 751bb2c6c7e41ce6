"""Process groups beyond megatron-core's own: the ITC sub-mesh of GBA-ITC.

megatron-core creates the tensor-, pipeline- and data-parallel groups
(:func:`megatron_m2.parallel.distributed.initialize_model_parallel`). GBA-ITC adds one more level:
the N data-parallel ranks of every (TP, PP) coordinate are split into G = N / k **ITC groups** of
k consecutive DP ranks. Embeddings are gathered only inside an ITC group, so with k = the DP ranks
of one node the contrastive loss never crosses the inter-node network. k = N is ordinary global
ITC; k = 1 is a per-rank loss.

Node membership comes from ``LOCAL_WORLD_SIZE`` (torchrun; ranks are laid out node by node) and
otherwise from the host names of the ranks.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from ..config import ConfigError
from ..layout import misaligned_itc_group, resolve_itc_group_size
from .distributed import collective_timeout

logger = logging.getLogger(__name__)

__all__ = ["ITCGroups", "resolve_itc_group_size", "create_itc_groups", "node_ids"]


@dataclass
class ITCGroups:
    """This rank's ITC group and the layout of all of them."""

    group: Optional[dist.ProcessGroup]
    """This rank's ITC group (``None`` when k = 1: nothing to gather)."""
    size: int
    """k: DP ranks per ITC group."""
    dp_size: int
    """N: data-parallel ranks per (TP, PP) coordinate."""
    dp_ranks_per_node: int
    """DP ranks of one DP group that share this rank's node."""
    all_groups: List[List[int]]
    """Global ranks of every ITC group, for logging and validation."""

    @property
    def num_groups(self) -> int:
        return self.dp_size // self.size


def node_ids(world_size: Optional[int] = None) -> List[int]:
    """Node index of every global rank (collective over the world)."""
    world_size = world_size or dist.get_world_size()
    local = os.environ.get("LOCAL_WORLD_SIZE")
    if local:
        per = int(local)
        return [r // per for r in range(world_size)]
    names: List[Optional[str]] = [None] * world_size
    dist.all_gather_object(names, socket.gethostname())
    order = {n: i for i, n in enumerate(dict.fromkeys(names))}
    return [order[n] for n in names]


def create_itc_groups(group_size: Optional[int] = None, aggregate_nodes: Optional[int] = None,
                      require_node_aligned: Optional[bool] = None) -> ITCGroups:
    """Create the ITC sub-mesh of megatron's DP groups (collective: every rank must call it).

    ``require_node_aligned`` (default: when k is derived from nodes) checks that every ITC group
    holds whole nodes' worth of its DP ranks, or lies inside one node.
    """
    from megatron.core import parallel_state as ps

    my_dp = dist.get_process_group_ranks(ps.get_data_parallel_group())
    world = dist.get_world_size()
    all_dp: List[Optional[List[int]]] = [None] * world
    dist.all_gather_object(all_dp, list(my_dp))
    dp_groups = sorted({tuple(g) for g in all_dp})
    nodes = node_ids(world)
    me = dist.get_rank()
    dp_ranks_per_node = sum(1 for r in my_dp if nodes[r] == nodes[me])
    k = resolve_itc_group_size(len(my_dp), dp_ranks_per_node, group_size, aggregate_nodes)
    if require_node_aligned is None:
        require_node_aligned = group_size is None

    if require_node_aligned:
        bad = misaligned_itc_group(dp_groups, k, nodes)
        if bad:
            raise ConfigError(bad)
    mine, layout = None, []
    for dp in dp_groups:  # same order on every rank: new_group is collective over the world
        for i in range(0, len(dp), k):
            ranks = list(dp[i:i + k])
            layout.append(ranks)
            # The job's collective timeout (new_group's default would be 30 minutes).
            pg = dist.new_group(ranks, timeout=collective_timeout(),
                                group_desc="ITC_GROUP") if k > 1 else None
            if me in ranks:
                mine = pg
    logger.info("ITC groups: k=%d of N=%d DP ranks (%d groups per DP group, %d DP ranks per "
                "node)", k, len(my_dp), len(my_dp) // k, dp_ranks_per_node)
    return ITCGroups(mine, k, len(my_dp), dp_ranks_per_node, layout)
