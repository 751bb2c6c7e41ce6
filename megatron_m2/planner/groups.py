"""Rank arithmetic, and the real process groups of a plan built on a fake backend.

:func:`rank_groups` gives a rank's TP, PP, DP and ITC groups in megatron-core's ``tp-cp-ep-dp-pp``
order; :func:`build_groups` creates them with megatron-core and
:func:`megatron_m2.parallel.groups.create_itc_groups` on a fake ``torch.distributed`` backend
(the planner's only use of torch, imported when called) and compares; without a fake backend
:func:`_check_with_rank_generator` checks megatron-core's ``RankGenerator`` instead.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

from ..config import ConfigError
from .inputs import RANK_ORDER

_GROUP_KEYS = ("tp_group", "pp_group", "dp_group", "itc_group")


def rank_groups(tp: int, pp: int, world_size: int, gpus_per_node: int, itc_group_size: int,
                rank: int) -> Dict[str, object]:
    """This rank's coordinates and groups in megatron-core's ``tp-cp-ep-dp-pp`` order.

    ``rank = tp_rank + TP·(dp_rank + DP·pp_rank)``: the TP group is TP consecutive ranks, the
    DP group the ranks sharing (tp_rank, pp_rank) with stride TP, the PP group stride TP·DP;
    the ITC group is the k consecutive members of the DP group that contain this rank.
    """
    dp = world_size // (tp * pp)
    tp_rank, dp_rank, pp_rank = rank % tp, (rank // tp) % dp, rank // (tp * dp)
    dp_group = [tp_rank + tp * j + tp * dp * pp_rank for j in range(dp)]
    start = dp_rank // itc_group_size * itc_group_size
    return {
        "rank": rank, "node": rank // gpus_per_node,
        "tp_rank": tp_rank, "dp_rank": dp_rank, "pp_rank": pp_rank,
        "tp_group": [rank - tp_rank + i for i in range(tp)],
        "pp_group": [tp_rank + tp * dp_rank + tp * dp * i for i in range(pp)],
        "dp_group": dp_group,
        "itc_group": dp_group[start:start + itc_group_size],
    }


def spans_nodes(groups: List[List[int]], gpn: int) -> bool:
    """Whether any of ``groups`` holds ranks of more than one node."""
    return any(len({r // gpn for r in g}) > 1 for g in groups)


def build_groups(plan, ranks: Sequence[int]) -> Dict[str, object]:
    """Create this layout's process groups for each of ``ranks`` of the full world on CPU.

    For each rank, in this process: ``torch.distributed`` is initialised with the ``fake``
    backend (``torch.testing._internal.distributed.fake_pg``: a process group of the full
    world size that performs no communication), megatron-core's
    ``parallel_state.initialize_model_parallel(tp, pp)`` builds its groups and
    :func:`megatron_m2.parallel.groups.create_itc_groups` builds the ITC sub-mesh (node
    membership from ``LOCAL_WORLD_SIZE`` = GPUs per node, as under torchrun). The ranks of
    this rank's TP, PP, DP and ITC groups are then compared with :func:`rank_groups`.

    Two things differ from a real run, both forced by a backend without peers:
    ``create_gloo_process_groups=False`` (gloo cannot be created on a fake store; the gloo
    groups are copies of the same rank lists), and the one object collective of
    ``create_itc_groups`` (``all_gather_object`` of every rank's DP group, which a fake backend
    leaves unanswered) is answered from megatron-core's ``RankGenerator`` — after checking that
    this rank's own entry equals the DP group megatron-core just created. Everything else
    (every ``new_group``, the ITC grouping and its node-alignment check) runs unchanged.

    Returns ``{"backend": "fake", "ranks": [...], "consistent": bool}``; each rank's entry
    holds the groups built and any ``mismatches`` with the plan's arithmetic. Must run in a
    process where ``torch.distributed`` is not initialised.
    """
    if not plan.valid:
        raise ConfigError("cannot build the groups of an invalid layout: "
                          + "; ".join(plan.errors))
    import os
    import warnings as _warnings

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from ..parallel.groups import create_itc_groups

        try:
            from torch.testing._internal.distributed.fake_pg import FakeStore
        except ImportError as e:  # torch without the fake backend
            return _check_with_rank_generator(plan, ranks, f"no fake backend in this torch ({e})")

    if dist.is_initialized():
        raise RuntimeError("build_groups needs a process without an initialised "
                           "torch.distributed (it creates fake worlds of the plan's size)")
    lay, cl = plan.layout, plan.cluster
    world = cl.world_size
    generator = ps.RankGenerator(tp=lay.tp, ep=1, dp=plan.derived["dp"], pp=lay.pp, cp=1,
                                 order=RANK_ORDER)
    dp_of = {}
    for g in generator.get_ranks("dp"):
        for r in g:
            dp_of[r] = list(g)
    results = []
    saved_env = os.environ.get("LOCAL_WORLD_SIZE")
    real_gather = dist.all_gather_object
    try:
        os.environ["LOCAL_WORLD_SIZE"] = str(cl.gpus_per_node)
        for rank in ranks:
            if not 0 <= rank < world:
                raise ValueError(f"rank {rank} is outside the world of {world}")
            built = _build_rank(plan, rank, dp_of, FakeStore, create_itc_groups)
            results.append(_compare(plan, built))
    finally:
        dist.all_gather_object = real_gather
        if saved_env is None:
            os.environ.pop("LOCAL_WORLD_SIZE", None)
        else:
            os.environ["LOCAL_WORLD_SIZE"] = saved_env
    return {"backend": "fake", "world_size": world, "ranks": results,
            "consistent": all(not r["mismatches"] for r in results)}


def _build_rank(plan, rank: int, dp_of: Dict[int, List[int]], store_cls: type,
                create_itc_groups: Callable) -> Dict[str, object]:
    """The groups megatron-core and ``create_itc_groups`` build for ``rank`` in a fake world
    of the plan's size (``all_gather_object`` answered from ``dp_of``, every rank's DP group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    lay, cl = plan.layout, plan.cluster
    real_gather = dist.all_gather_object
    dist.init_process_group("fake", store=store_cls(), rank=rank, world_size=cl.world_size)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=lay.tp,
                                     pipeline_model_parallel_size=lay.pp,
                                     create_gloo_process_groups=False)
        built_dp = dist.get_process_group_ranks(ps.get_data_parallel_group())

        def simulated_gather(output, obj, group=None, _me=rank):
            if group is not None or list(obj) != dp_of[_me]:
                raise RuntimeError(f"unexpected all_gather_object({obj!r}, group="
                                   f"{group!r}) on the fake backend")
            output[:] = [dp_of[r] for r in range(cl.world_size)]

        dist.all_gather_object = simulated_gather
        try:
            itc = create_itc_groups(lay.itc_group_size, lay.itc_aggregate_nodes)
        finally:
            dist.all_gather_object = real_gather
        return {
            "rank": rank, "node": rank // cl.gpus_per_node,
            "tp_group": dist.get_process_group_ranks(ps.get_tensor_model_parallel_group()),
            "pp_group": dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group()),
            "dp_group": built_dp,
            "itc_group": (dist.get_process_group_ranks(itc.group)
                          if itc.group is not None else [rank]),
            "itc_group_size": itc.size, "itc_num_groups": itc.num_groups,
            "dp_ranks_per_node": itc.dp_ranks_per_node,
        }
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def _compare(plan, built: Dict[str, object]) -> Dict[str, object]:
    """``built`` with its ``itc_nodes`` and its ``mismatches`` with the plan: group ranks, ITC
    group size, and an ITC group spanning nodes where the plan says intra-node."""
    gpn = plan.cluster.gpus_per_node
    expected = plan.rank_groups(built["rank"])
    mismatches = [f"{key}: built {built[key]} vs planned {expected[key]}"
                  for key in _GROUP_KEYS if list(built[key]) != list(expected[key])]
    if built["itc_group_size"] != plan.derived["itc_group_size"]:
        mismatches.append(f"itc_group_size: built {built['itc_group_size']} vs planned "
                          f"{plan.derived['itc_group_size']}")
    itc_nodes = sorted({r // gpn for r in built["itc_group"]})
    built["itc_nodes"] = itc_nodes
    planned_link = plan.communication["itc"]["gba"]["link"]
    if planned_link == "intra-node" and len(itc_nodes) > 1:
        mismatches.append(f"ITC group spans nodes {itc_nodes} but the plan says "
                          f"intra-node")
    built["mismatches"] = mismatches
    return built


def _check_with_rank_generator(plan, ranks: Sequence[int], reason: str
                               ) -> Dict[str, object]:
    """Fallback of :func:`build_groups` without a fake backend: megatron-core's
    ``RankGenerator`` (what ``initialize_model_parallel`` builds its groups from) gives the TP,
    PP and DP groups; the ITC groups come from
    :func:`~megatron_m2.layout.resolve_itc_group_size` and the node-alignment check of
    ``create_itc_groups`` (:func:`~megatron_m2.layout.misaligned_itc_group`). No process group
    is created."""
    from megatron.core import parallel_state as ps

    from ..layout import misaligned_itc_group, resolve_itc_group_size

    lay, cl = plan.layout, plan.cluster
    gen = ps.RankGenerator(tp=lay.tp, ep=1, dp=plan.derived["dp"], pp=lay.pp, cp=1,
                           order=RANK_ORDER)
    by_kind = {kind: {r: list(g) for g in gen.get_ranks(kind) for r in g}
               for kind in ("tp", "pp", "dp")}
    nodes = [cl.node_of(r) for r in range(cl.world_size)]
    results = []
    for rank in ranks:
        dp = by_kind["dp"][rank]
        per_node = sum(1 for r in dp if nodes[r] == nodes[rank])
        k = resolve_itc_group_size(len(dp), per_node, lay.itc_group_size,
                                   lay.itc_aggregate_nodes)
        start = dp.index(rank) // k * k
        itc = dp[start:start + k]
        bad = misaligned_itc_group([dp], k, nodes) if lay.itc_group_size is None else None
        if bad:
            raise ConfigError(bad)
        built = {"rank": rank, "node": nodes[rank], "tp_group": by_kind["tp"][rank],
                 "pp_group": by_kind["pp"][rank], "dp_group": dp, "itc_group": itc,
                 "itc_group_size": k, "itc_nodes": sorted({nodes[r] for r in itc})}
        expected = plan.rank_groups(rank)
        built["mismatches"] = [f"{key}: built {built[key]} vs planned {expected[key]}"
                               for key in _GROUP_KEYS if built[key] != expected[key]]
        results.append(built)
    return {"backend": "rank-generator", "reason": reason, "world_size": cl.world_size,
            "ranks": results, "consistent": all(not r["mismatches"] for r in results)}
