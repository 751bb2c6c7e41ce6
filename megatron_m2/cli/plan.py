"""``m2-plan`` / ``tools/plan.py``: plan an M2-Encoder training layout without hardware.

Validates a TP × PP × DP layout with m2-pretrain's rules, estimates per-GPU memory, traffic per
group and link, FLOPs and step time, and searches for the fastest layout that fits
(:mod:`megatron_m2.planner`; formulas in docs/planner.md). ``--build-groups`` creates the layout's
real process groups for a few ranks of the full world on a fake ``torch.distributed`` backend
and checks them against the plan. ``--list-flavors`` lists the named flavors (their dimensions
and parameter counts) instead of planning.

Examples::

    m2-plan --flavor 10b --nodes 32 --gpus-per-node 8
    m2-plan --flavor 10b --nodes 32 --recommend
    m2-plan --flavor 10b --nodes 32 --tp 4 --pp 2 --use-distributed-optimizer --json
    m2-plan --model-config my_model.json --nodes 4 --build-groups --ranks 0,17
    m2-plan --flavor 0.4b --nodes 4 --objective m2 --mim-target pixel
    m2-plan --flavor 0.4b --nodes 4 --objective m2 --visual-tokenizer vqkd.pth
    m2-plan --flavor 0.4b --nodes 4 --objective m2 --mim-target pixel --image-mask-style attentive
    m2-plan --flavor 10b --nodes 4 --tp 4 --pp 2 --sequence-parallel \\
        --num-layers-per-virtual-pipeline-stage 3 --use-distributed-optimizer \\
        --overlap-grad-reduce --overlap-param-gather
    m2-plan --flavor 0.4b --nodes 4 --image-mask-ratio 0.5
    m2-plan --list-flavors [--json]

Exit status: 0 for a valid layout (fitting or not: see ``fits``), 2 for an invalid one (with
``--recommend``: when no layout fits) and for a usage error or unreadable ``--model-config``
(one line ``m2-plan: error: ...``), 1 when ``--build-groups`` finds groups that disagree with
the plan.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

from .. import planner
from ..errors import UserError
from ..flavors import FLAVORS, count_parameters
from .common import ArgumentParser, run_cli

__all__ = ["build_parser", "flavor_table", "format_flavor_table", "main", "PROG"]

PROG = "m2-plan"


def _ranks(value: str) -> List[int]:
    try:
        ranks = [int(r) for r in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}")
    if any(r < 0 for r in ranks):
        raise argparse.ArgumentTypeError(f"ranks must be >= 0, got {value!r}")
    return ranks


def build_parser() -> ArgumentParser:
    """The command line (flag names follow m2-pretrain where the concept exists)."""
    p = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                       epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--flavor", choices=sorted(FLAVORS), default="10b",
                     help="named architecture (--list-flavors describes them)")
    src.add_argument("--model-config", default=None, metavar="JSON",
                     help="JSON file of M2ModelConfig fields instead of a flavor (a 'params' "
                          "entry, as --list-flavors --json prints, is ignored)")

    g = p.add_argument_group("cluster")
    g.add_argument("--nodes", type=int, default=1, help="nodes in the job")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    g.add_argument("--gpu-memory-gb", type=float, default=80.0, help="GB (1e9 bytes) per GPU")
    g.add_argument("--intra-node-gbps", type=float, default=450.0,
                   help="GB/s per GPU and direction inside a node (NVLink)")
    g.add_argument("--inter-node-gbps", type=float, default=50.0,
                   help="GB/s per GPU and direction between nodes (400 Gb/s IB per GPU)")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="dense BF16 TFLOP/s per GPU (FP8 GEMMs: twice this)")
    g.add_argument("--fp32-peak-tflops", type=float, default=67.0,
                   help="FP32 TFLOP/s per GPU (no TF32), for a VQ-KD run without --bf16 "
                        "(planned commands carry --bf16: its encoder runs in bf16 autocast)")
    g.add_argument("--cpu-cores-per-gpu", type=float, default=12.0,
                   help="CPU cores per GPU for the data loaders (one is kept for the training "
                        "process)")
    g.add_argument("--cpu-decode-samples-per-core", type=float,
                   default=planner.CPU_DECODE_SAMPLES_PER_CORE,
                   help="samples/s one loader worker delivers on the CPU decode path (measure "
                        "yours with tools/bench_data.py --decode)")

    g = p.add_argument_group("layout")
    g.add_argument("--tp", "--tensor-model-parallel-size", dest="tp", type=int, default=1,
                   help="tensor-parallel size")
    g.add_argument("--pp", "--pipeline-model-parallel-size", dest="pp", type=int, default=1,
                   help="pipeline-parallel size")
    g.add_argument("--micro-batch-size", type=int, default=8, help="samples per micro-batch")
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="samples per step (unset: micro-batch x data-parallel size)")
    g.add_argument("--itc-group-size", type=int, default=None,
                   help="k in DP ranks (-1: global ITC; unset: one node's DP ranks)")
    g.add_argument("--itc-aggregate-nodes", type=int, default=None,
                   help="k in whole nodes (-1: all)")
    g.add_argument("--itc-heads", choices=["both", "vl"], default="both",
                   help="ITC heads trained, as m2-pretrain's --itc-heads")
    g.add_argument("--itc-accumulate-features", action="store_true",
                   help="as m2-pretrain's --itc-accumulate-features")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over the data-parallel ranks")
    g.add_argument("--precision", choices=["bf16", "fp8"], default="bf16",
                   help="GEMM precision")
    g.add_argument("--recompute", action="store_true",
                   help="recompute layers in the backward (as many as m2-pretrain allows)")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="recomputed layers per stage (block method)")

    g = p.add_argument_group("scale features (as m2-pretrain's flags)")
    g.add_argument("--image-mask-ratio", type=float, default=0.0, metavar="R",
                   help="patch dropout (FLIP): training steps keep round((1 - R) x patches) "
                        "patches plus [CLS] (--objective itc; the plan is for the masked "
                        "steps)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="shard the activations outside the TP regions along the sequence "
                        "(each modality part padded to a multiple of TP; TP >= 2)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   metavar="N", help="interleaved pipeline: model chunks of N layers, "
                                     "L / (PP x N) per pipeline rank")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets during the last micro-batch's backward")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: all-gather the parameters during "
                        "the next step's first forward")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket with --overlap-grad-reduce (default: "
                        "megatron-core's, max(4e7, 1e6 x DP))")

    g = p.add_argument_group("objective (as m2-pretrain's flags)")
    g.add_argument("--objective", choices=["itc", "m2"], default="itc",
                   help="itc: GBA-ITC; m2: GBA-ITC + CMLM + CMIM (fused columns, masked heads, "
                        "VQ-KD targets)")
    g.add_argument("--cmlm-weight", type=float, default=None,
                   help="CMLM weight (0: no CMLM pass; default 1.0 with --objective m2)")
    g.add_argument("--cmim-weight", type=float, default=None,
                   help="CMIM weight (0: no CMIM pass; default 1.0 with --objective m2)")
    g.add_argument("--mvlm-prob", type=float, default=0.5,
                   help="share of caption pieces masked in the CMLM pass")
    g.add_argument("--mim-target", choices=["vqkd", "pixel"], default="vqkd",
                   help="CMIM targets: frozen VQ-KD codes (needs --visual-tokenizer) or pixels")
    g.add_argument("--visual-tokenizer", default=None, metavar="PATH",
                   help="VQ-KD weights, passed on to m2-pretrain (not read: BEiT-v2's ViT-B/16, "
                        "8192 codes, assumed)")
    g.add_argument("--visual-tokenizer-heads", type=int, default=None,
                   help="passed on to m2-pretrain")
    g.add_argument("--image-mask-patches", type=int, default=None,
                   help="patches masked per image in the CMIM pass (default: 80/196 of them)")
    g.add_argument("--image-mask-style", choices=["block", "attentive"], default="block",
                   help="CMIM masking: block-wise, or text-guided attentive (a forward-only "
                        "scoring pass of the contrastive columns; free with "
                        "--itc-accumulate-features)")
    g.add_argument("--attentive-mask-temperature", type=float, default=0.0,
                   help="passed on to m2-pretrain (0: top patches; T > 0: Gumbel top-k)")
    g.add_argument("--cmlm-tie-embeddings", action="store_true",
                   help="CMLM head tied to the text embedding (PP=1)")

    g = p.add_argument_group("assumptions")
    g.add_argument("--mfu", type=float, default=0.4,
                   help="fraction of peak FLOP/s while computing")
    g.add_argument("--overhead-gb", type=float, default=3.0,
                   help="fixed memory per GPU (CUDA context, workspaces, NCCL buffers)")
    g.add_argument("--collective-latency-us", type=float, default=10.0,
                   help="latency of one collective, microseconds")
    g.add_argument("--dp-overlap", type=float, default=None,
                   help="override: fraction of the DP traffic hidden (a measured value; unset: "
                        "derived from --overlap-grad-reduce, --overlap-param-gather, the "
                        "buckets and the pipeline)")

    g = p.add_argument_group("output")
    g.add_argument("--recommend", action="store_true",
                   help="print the layout search and the report of the recommended layout")
    g.add_argument("--top", type=int, default=10,
                   help="fitting layouts listed by --recommend (the JSON lists all)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument("--build-groups", action="store_true",
                   help="build the process groups of --ranks on a fake backend (needs torch "
                        "and megatron-core) and check them against the plan")
    g.add_argument("--ranks", type=_ranks, default=None, metavar="R[,R...]",
                   help="comma-separated global ranks for --build-groups (unset: first, "
                        "a middle one, last)")
    g.add_argument("--list-flavors", action="store_true",
                   help="list the named flavors and their parameter counts (with --json: one "
                        "object {flavor: {config fields..., params}}) and exit")
    return p


# -- the flavor list ------------------------------------------------------------------------------
def flavor_table() -> Dict[str, Dict[str, object]]:
    """``{flavor: {...M2ModelConfig fields..., "params": N}}``; ``params`` is the full model's
    parameter count at TP=1 (:func:`megatron_m2.flavors.count_parameters`, no allocation)."""
    return {name: dict(cfg.to_dict(), params=count_parameters(cfg))
            for name, cfg in FLAVORS.items()}


def format_flavor_table(table: Dict[str, Dict[str, object]]) -> str:
    """The text table of ``--list-flavors`` (layers as ``separate+VL``)."""
    lines = [f"{'flavor':<8}{'d':>6}{'heads':>7}{'d_ffn':>7}{'layers':>9}{'embed':>7}"
             f"{'params':>16}"]
    for name, row in table.items():
        lines.append(f"{name:<8}{row['hidden_size']:>6}{row['num_attention_heads']:>7}"
                     f"{row['ffn_hidden_size']:>7}"
                     f"{row['num_sep_layers']:>5}+{row['num_vl_layers']:<3}"
                     f"{row['embed_dim']:>7}{row['params']:>16,}")
    return "\n".join(lines)


# -- the plan -------------------------------------------------------------------------------------
def _print_groups(groups: dict) -> None:
    print(f"\nprocess groups on the {groups['backend']} backend, world "
          f"{groups['world_size']}:")
    short = planner.short_ranks
    for r in groups["ranks"]:
        print(f"  rank {r['rank']} (node {r['node']}): TP {short(r['tp_group'])} "
              f"PP {short(r['pp_group'])} DP {short(r['dp_group'])} "
              f"ITC {short(r['itc_group'])} (nodes {r['itc_nodes']})")
        for mm in r["mismatches"]:
            print(f"    MISMATCH {mm}")
    print("  consistent with the plan" if groups["consistent"]
          else "  INCONSISTENT with the plan")


def _main(argv: Optional[List[str]] = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_flavors:
        table = flavor_table()
        print(json.dumps(table) if args.json else format_flavor_table(table))
        return 0
    try:
        name, cfg = planner.resolve_model(args.flavor, args.model_config)
    except ValueError as e:  # not JSON, or not M2ModelConfig fields (ConfigError is one)
        msg = str(e)
        if args.model_config and args.model_config not in msg:
            msg = f"--model-config {args.model_config}: {msg}"
        raise UserError(msg) from e
    cluster = planner.Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gb,
                              args.intra_node_gbps, args.inter_node_gbps, args.peak_tflops,
                              args.fp32_peak_tflops, args.cpu_cores_per_gpu,
                              args.cpu_decode_samples_per_core)
    layout = planner.Layout(
        tp=args.tp, pp=args.pp, micro_batch=args.micro_batch_size,
        global_batch=args.global_batch_size, itc_group_size=args.itc_group_size,
        itc_aggregate_nodes=args.itc_aggregate_nodes, itc_heads=args.itc_heads,
        itc_accumulate_features=args.itc_accumulate_features,
        distributed_optimizer=args.use_distributed_optimizer, precision=args.precision,
        recompute=args.recompute, recompute_num_layers=args.recompute_num_layers,
        objective=args.objective, cmlm_weight=args.cmlm_weight, cmim_weight=args.cmim_weight,
        mvlm_prob=args.mvlm_prob, mim_target=args.mim_target,
        visual_tokenizer=args.visual_tokenizer,
        visual_tokenizer_heads=args.visual_tokenizer_heads,
        image_mask_patches=args.image_mask_patches,
        cmlm_tie_embeddings=args.cmlm_tie_embeddings, image_mask_style=args.image_mask_style,
        attentive_mask_temperature=args.attentive_mask_temperature,
        image_mask_ratio=args.image_mask_ratio, sequence_parallel=args.sequence_parallel,
        layers_per_virtual_stage=args.num_layers_per_virtual_pipeline_stage,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather, ddp_bucket_size=args.ddp_bucket_size)
    assumptions = planner.Assumptions(args.mfu, args.overhead_gb, args.collective_latency_us,
                                      args.dp_overlap)
    plan = planner.make_plan(cfg, layout, cluster, assumptions, name)
    rec = planner.recommend(cfg, layout, cluster, assumptions, name)
    target = rec.best if args.recommend and rec.best else plan

    groups = None
    if args.build_groups and target.valid:
        world = cluster.world_size
        ranks = args.ranks or sorted({0, world // 2 + 1 if world > 2 else 0, world - 1})
        outside = [r for r in ranks if r >= world]
        if outside:
            p.error(f"argument --ranks: {', '.join(map(str, outside))} outside the world of "
                    f"{world} ranks")
        groups = planner.build_groups(target, ranks)

    if args.json:
        out = {"plan": plan.to_dict(), "recommendation": rec.to_dict()}
        out["recommendation"]["plan"] = rec.best.to_dict() if rec.best else None
        if args.build_groups:
            out["groups"] = groups
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        if args.recommend:
            print(planner.format_recommendation(rec, limit=args.top))
            print()
        print(planner.format_plan(target))
        if not args.recommend:
            best = rec.best.layout.key() if rec.best else "none fits"
            print(f"\nrecommended layout: {best} (--recommend for the search)")
        if groups:
            _print_groups(groups)
    if (args.recommend and rec.best is None) or not target.valid:
        return 2
    if groups is not None and not groups["consistent"]:
        return 1
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of ``m2-plan`` / ``tools/plan.py``; see the module docstring for the exit
    status."""
    return run_cli(PROG, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
