"""The layout search: :func:`recommend` plans every TP × PP × distributed-optimizer ×
recomputation combination and picks the fastest that fits (:class:`Recommendation`)."""

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


def recommend(model: M2ModelConfig, template: Layout = Layout(), cluster: Cluster = Cluster(),
              assumptions: Assumptions = Assumptions(), model_name: str = "custom",
              tp_choices: Sequence[int] = (1, 2, 4, 8)) -> Recommendation:
    """Search TP ∈ ``tp_choices`` (within a node) × PP ∈ divisors of the layer count ×
    distributed optimizer on/off × recomputation on/off, keeping the rest of ``template``
    (micro-batch, global batch, ITC settings, precision), and pick the valid plan that fits
    memory with the shortest step time (ties: less memory)."""
    pps = [p for p in range(1, model.num_layers + 1) if model.num_layers % p == 0]
    candidates = []
    for tp in tp_choices:
        if tp > cluster.gpus_per_node:
            continue
        for pp in pps:
            for dist_opt in (False, True):
                for rc in (False, True):
                    lay = dataclasses.replace(template, tp=tp, pp=pp,
                                              distributed_optimizer=dist_opt, recompute=rc,
                                              recompute_num_layers=None)
                    candidates.append(make_plan(model, lay, cluster, assumptions, model_name))
    fitting = [p for p in candidates if p.fits]
    best = min(fitting, key=lambda p: (p.time["step_time_s"], p.memory["peak_bytes"]),
               default=None)
    return Recommendation(best, candidates)
