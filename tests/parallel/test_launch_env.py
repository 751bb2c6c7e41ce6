"""Rank discovery from torchrun and Slurm environments."""

import pytest

from megatron_m2.parallel.distributed import discover_env, expand_nodelist


@pytest.mark.parametrize("nodelist,hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
    ("a[1-2],b3,c[08-10]", ["a1", "a2", "b3", "c08", "c09", "c10"]),
    ("rack1-n[9-11]", ["rack1-n9", "rack1-n10", "rack1-n11"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_torchrun_env_wins():
    env = discover_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                        "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "SLURM_PROCID": "0",
                        "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 1234)


def test_slurm_env():
    env = discover_env({"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_LOCALID": "5",
                        "SLURM_JOB_NODELIST": "dgx[004-005]", "SLURM_JOB_ID": "4242"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (13, 16, 5, "slurm")
    assert env.master_addr == "dgx004"
    assert env.master_port == 20000 + 4242


def test_single_process():
    env = discover_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert env.master_port > 0
