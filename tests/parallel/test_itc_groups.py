"""ITC group sizing and node alignment (pure functions; the collective path is exercised by
tests/loss/test_gba_itc.py and tests/training/test_gba_training.py)."""

import pytest

from megatron_m2.config import ConfigError
from megatron_m2.layout import misaligned_itc_group, resolve_itc_group_size


@pytest.mark.parametrize("kwargs,k", [
    (dict(), 8),                                 # default: one node's DP ranks
    (dict(group_size=-1), 256),                  # global ITC
    (dict(group_size=4), 4),
    (dict(aggregate_nodes=2), 16),
    (dict(aggregate_nodes=-1), 256),
])
def test_resolve_group_size(kwargs, k):
    assert resolve_itc_group_size(256, 8, **kwargs) == k


def test_default_is_capped_at_dp_size():
    assert resolve_itc_group_size(2, 8) == 2


@pytest.mark.parametrize("kwargs,msg", [
    (dict(group_size=3), "must divide"),
    (dict(group_size=512), "must lie in"),
    (dict(aggregate_nodes=3), "must divide"),      # 24 does not divide 256
    (dict(aggregate_nodes=0), "-1 or >= 1"),
    (dict(group_size=2, aggregate_nodes=1), "mutually exclusive"),
])
def test_resolve_errors(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        resolve_itc_group_size(256, 8, **kwargs)


def test_node_alignment():
    nodes = [0, 0, 1, 1, 2, 2, 3, 3]  # 2 ranks per node
    dp = [list(range(8))]
    assert misaligned_itc_group(dp, 2, nodes) is None      # inside one node
    assert misaligned_itc_group(dp, 1, nodes) is None
    assert misaligned_itc_group(dp, 4, nodes) is None      # two whole nodes
    # Groups of 2 starting at rank 1 straddle two nodes.
    assert "not node-aligned" in misaligned_itc_group([[1, 2, 3, 4]], 2, nodes)
