"""The layout search: :func:`recommend` plans every TP × PP × distributed-optimizer ×
recomputation × sequence-parallel combination, with and without an interleaved pipeline, and
picks the fastest that fits (:class:`Recommendation`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from ..config import M2ModelConfig
from .inputs import GB, Assumptions, Cluster, Layout
from .plan import Plan, make_plan


@dataclass
class Recommendation:
    """Result of :func:`recommend`: the fastest plan that fits, and every candidate."""

    best: Optional[Plan]
    candidates: List[Plan]

    def rows(self) -> List[Dict[str, object]]:
        """One row per candidate: its summary, and why it was rejected (if it was)."""
        out = []
        for p in self.candidates:
            row = p.summary()
            if not p.valid:
                row["rejected"] = "invalid: " + "; ".join(p.errors)
            elif not p.memory["fits"]:
                row["rejected"] = "does not fit: " + _memory_reason(p)
            out.append(row)
        return out

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready form."""
        return {"best": self.best.summary() if self.best else None,
                "best_layout": dataclasses.asdict(self.best.layout) if self.best else None,
                "candidates": self.rows()}


def _memory_reason(p: Plan) -> str:
    st = p.memory["per_stage"][p.memory["peak_stage"]]
    return (f"stage {st['stage']} needs {st['total_bytes'] / GB:.1f} GB > "
            f"{p.cluster.gpu_memory_gb:g} GB (weights {st['weights_bytes'] / GB:.1f}, grads "
            f"{st['grads_bytes'] / GB:.1f}, optimizer {st['optimizer_bytes'] / GB:.1f}, "
            f"activations {st['activations_bytes'] / GB:.1f}, overhead "
            f"{st['overhead_bytes'] / GB:.1f})")


def _chunk_sizes(model: M2ModelConfig, pp: int) -> List[int]:
    """The interleaved pipelines the search tries at ``pp``: two chunks per rank (the
    fewest: the least extra p2p and in-flight memory) and the most chunks (the smallest
    bubble), as layers per chunk; none at PP = 1 or when a stage cannot be cut in two."""
    per = model.num_layers // pp
    sizes = [n for n in range(1, per) if per % n == 0 and per // n >= 2] if pp > 1 else []
    return sorted({sizes[0], sizes[-1]}) if sizes else []


def _faster(a: Plan, b: Plan) -> Plan:
    """The plan with the shorter step (``a`` on a tie, or when ``b`` is not valid)."""
    if not b.valid or (a.valid and a.time["step_time_s"] <= b.time["step_time_s"]):
        return a
    return b


def recommend(model: M2ModelConfig, template: Layout = Layout(), cluster: Cluster = Cluster(),
              assumptions: Assumptions = Assumptions(), model_name: str = "custom",
              tp_choices: Sequence[int] = (1, 2, 4, 8)) -> Recommendation:
    """Search TP ∈ ``tp_choices`` (within a node) × PP ∈ divisors of the layer count ×
    distributed optimizer on/off × recomputation on/off × sequence parallelism on/off (TP ≥ 2),
    each also with an interleaved pipeline (:func:`_chunk_sizes`; listed only when valid),
    keeping the rest of ``template`` (micro-batch, global batch, ITC settings, precision,
    objective, patch dropout, bucket size), and pick the valid plan that fits memory with the
    shortest step time (ties: less memory).

    The overlap flags are tried where they apply (DP > 1: ``--overlap-grad-reduce``, and
    ``--overlap-param-gather`` with the distributed optimizer) and kept when they shorten the
    planned step (:func:`~megatron_m2.planner.timing.dp_exposure`; they cost only the extra
    buckets' latencies when the backward is too short to hide anything); a template that sets
    them keeps them. The interleaved variants take the overlap flags of the layout they
    interleave."""
    pps = [p for p in range(1, model.num_layers + 1) if model.num_layers % p == 0]
    candidates = []
    world = cluster.world_size
    for tp in tp_choices:
        if tp > cluster.gpus_per_node:
            continue
        for pp in pps:
            dp = world // (tp * pp) if world % (tp * pp) == 0 else 0
            for dist_opt in (False, True):
                for rc in (False, True):
                    for sp in ((False, True) if tp >= 2 else (False,)):
                        lay = dataclasses.replace(
                            template, tp=tp, pp=pp, distributed_optimizer=dist_opt,
                            recompute=rc, recompute_num_layers=None, sequence_parallel=sp,
                            layers_per_virtual_stage=None,
                            overlap_param_gather=template.overlap_param_gather and dist_opt)
                        plan = make_plan(model, lay, cluster, assumptions, model_name)
                        on = dataclasses.replace(lay, overlap_grad_reduce=True,
                                                 overlap_param_gather=dist_opt)
                        if plan.valid and dp > 1 and on != lay:
                            plan = _faster(plan, make_plan(model, on, cluster, assumptions,
                                                           model_name))
                        candidates.append(plan)
                        if not plan.valid:
                            continue
                        for n in _chunk_sizes(model, pp):
                            p = make_plan(model, dataclasses.replace(
                                plan.layout, layers_per_virtual_stage=n), cluster, assumptions,
                                model_name)
                            if p.valid:
                                candidates.append(p)
    fitting = [p for p in candidates if p.fits]
    best = min(fitting, key=lambda p: (p.time["step_time_s"], p.memory["peak_bytes"]),
               default=None)
    return Recommendation(best, candidates)
