# shellcheck shell=bash
# Shared part of the examples/slurm/m2_*.sbatch recipes (sourced, not run): the allocation, the
# TP x PP x DP layout, the ITC group, the m2-pretrain flags and the srun + torchrun command.
#
# A recipe sets its flavor's defaults (FLAVOR TP PP MBS GRAD_ACC LR MIN_LR WARMUP ITERS), each as
# VAR=${VAR:-default} so the environment overrides it, sources this file and calls
# `m2_launch "$@"` (extra arguments go to m2-pretrain, last, so they win).
#
# Launch model: one Slurm task per node (srun --ntasks-per-node=1) running one torchrun that
# starts GPUS_PER_NODE ranks. Why not one task per GPU (which megatron_m2 also supports, reading
# SLURM_PROCID): torchrun sets LOCAL_WORLD_SIZE, from which the ITC groups learn node membership
# without a host-name all-gather; with pyxis, enroot starts one container per node instead of
# GPUS_PER_NODE; and the command is the same torchrun line as on one node or a laptop.
# Rendezvous: torchrun's c10d store on the first node of the allocation, so every node runs the
# identical command (no per-node --node-rank to template).
#
# Everything below is VAR=${VAR:-default}; the common knobs:
#   LAUNCHER=pyxis|module   srun --container-image (pyxis/enroot) or the host's modules/venv
#   PRECISION=bf16|fp8      --bf16, or --bf16 plus FP8 (Transformer Engine, delayed scaling)
#   DRY_RUN=1               print the commands (printf %q, one per line) and exit 0; outside
#                           Slurm it uses a fake allocation of 2 nodes, node[001-002]
#   DATA_ROOT DATA VALID_DATA TOKENIZER OUT_ROOT SAVE LOAD IMAGE CONTAINER_MOUNTS VENV MODULES
#   ITERS MBS GBS GRAD_ACC LR MIN_LR WARMUP TP PP GPUS_PER_NODE ITC_GROUP_SIZE ...

m2_die() {
  printf 'm2-slurm: error: %s\n' "$*" >&2
  exit 2
}

# One command, quoted so that it can be pasted back into a shell.
m2_print_cmd() {
  local line
  printf -v line '%q ' "$@"
  printf '%s\n' "${line% }"
}

# Expand a Slurm node list (compressed, e.g. gpu[01-04,07]) to one host per line: scontrol where
# Slurm is installed, else the project's own expansion (megatron_m2.parallel.launch_env, a
# torch-free module, imported from this checkout).
m2_hosts() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$1"
  else
    PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c \
      'import sys; from megatron_m2.parallel.launch_env import expand_nodelist as e; print("\n".join(e(sys.argv[1])))' \
      "$1"
  fi
}

m2_launch() {
  # --- where this runs -------------------------------------------------------------------------
  REPO=${REPO:-$(cd "$M2_SLURM_DIR/../.." && pwd)}
  PYTHON=${PYTHON:-python3}
  DRY_RUN=${DRY_RUN:-0}
  LAUNCHER=${LAUNCHER:-pyxis}
  PRECISION=${PRECISION:-bf16}

  # --- the allocation --------------------------------------------------------------------------
  local nodelist fake=""
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    nodelist=$SLURM_JOB_NODELIST
  elif [[ $DRY_RUN == 1 ]]; then
    # Fake allocation: SLURM_NNODES (default 2) nodes node001, node002, ...
    nodelist=$(printf 'node[001-%03d]' "${SLURM_NNODES:-2}")
    fake=" (fake allocation $nodelist: SLURM_JOB_NODELIST is not set)"
  else
    m2_die "SLURM_JOB_NODELIST is not set: submit with sbatch, or print the commands with DRY_RUN=1"
  fi
  local hosts
  mapfile -t hosts < <(m2_hosts "$nodelist")
  ((${#hosts[@]} > 0)) || m2_die "could not expand the node list '$nodelist'"
  NNODES=${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-${#hosts[@]}}}
  ((NNODES == ${#hosts[@]})) ||
    m2_die "SLURM_NNODES=$NNODES but '$nodelist' names ${#hosts[@]} host(s)"
  MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  JOB_ID=${SLURM_JOB_ID:-0}
  # Same per-job port rule as megatron_m2.parallel.launch_env, so two jobs sharing a node differ.
  RDZV_PORT=${RDZV_PORT:-$((20000 + JOB_ID % 20000))}
  GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}  # the recipes ask for 8 per node
  # A step's task gets one CPU unless it asks (and srun no longer inherits sbatch's
  # --cpus-per-task since Slurm 22.05): without this the torchrun task, its GPUS_PER_NODE ranks
  # and their data-loader workers could all share one CPU.
  CPUS_PER_TASK=${CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-64}}

  # --- layout: TP x PP x DP --------------------------------------------------------------------
  local world=$((NNODES * GPUS_PER_NODE))
  ((GPUS_PER_NODE % TP == 0)) ||
    m2_die "TP=$TP must divide GPUS_PER_NODE=$GPUS_PER_NODE: tensor parallelism stays inside a node"
  ((world % (TP * PP) == 0)) ||
    m2_die "$NNODES nodes x $GPUS_PER_NODE GPUs = $world ranks is not divisible by TP=$TP x PP=$PP"
  DP=$((world / (TP * PP)))
  # DP ranks of one DP group that share a node. megatron-core orders ranks tp-dp-pp (TP fastest,
  # PP slowest), so a node holds GPUS_PER_NODE / TP consecutive DP ranks of a group even when
  # PP > 1 (the pipeline stages then lie on different nodes) -- not GPUS_PER_NODE / (TP x PP).
  local dp_per_node=$((GPUS_PER_NODE / TP < DP ? GPUS_PER_NODE / TP : DP))

  # --- GBA-ITC: one ITC group = the DP ranks of one node (docs/gba_itc.md) ----------------------
  # The contrastive loss then gathers embeddings over NVLink only. ITC_AGGREGATE_NODES=n spans n
  # whole nodes instead (-1: global ITC); ITC_ACCUM=1 adds feature accumulation (k*M*b pairs
  # per contrastive batch, M = GRAD_ACC micro-batches, at one micro-batch's activation memory).
  ITC_GROUP_SIZE=${ITC_GROUP_SIZE:-$dp_per_node}
  ITC_AGGREGATE_NODES=${ITC_AGGREGATE_NODES:-}
  ITC_ACCUM=${ITC_ACCUM:-0}
  ITC_HEADS=${ITC_HEADS:-both}
  GRAD_ACC=${GRAD_ACC:-1}
  # Default global batch: GRAD_ACC micro-batches per DP rank, whatever the node count.
  GBS=${GBS:-$((MBS * DP * GRAD_ACC))}

  # --- data, checkpoints, logs -----------------------------------------------------------------
  DATA_ROOT=${DATA_ROOT:-/data/m2}
  DATA=${DATA:-$DATA_ROOT/train}  # 'PREFIX ...' or 'W1 PREFIX1 W2 PREFIX2 ...'
  VALID_DATA=${VALID_DATA:-}      # a prefix enables held-out retrieval evaluation
  TOKENIZER=${TOKENIZER:-$DATA_ROOT/tokenizer.model}
  SPLIT=${SPLIT:-100,0,0}
  CAPTION_LANG=${CAPTION_LANG:-balanced}
  NUM_WORKERS=${NUM_WORKERS:-8}
  OUT_ROOT=${OUT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}/runs}
  SAVE=${SAVE:-$OUT_ROOT/m2_${FLAVOR}_${PRECISION}}
  SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
  LOAD=${LOAD:-}  # default: resume from SAVE when it already holds a checkpoint
  LOG_INTERVAL=${LOG_INTERVAL:-10}
  EVAL_INTERVAL=${EVAL_INTERVAL:-2000}
  EVAL_MAX_SAMPLES=${EVAL_MAX_SAMPLES:-0}
  SEED=${SEED:-1234}
  WEIGHT_DECAY=${WEIGHT_DECAY:-0.05}
  CLIP_GRAD=${CLIP_GRAD:-1.0}
  TIMEOUT_MIN=${TIMEOUT_MIN:-30}
  # torchrun forwards SIGTERM to its workers and kills them this many seconds later: time to
  # finish the step and write the checkpoint (sbatch --signal=TERM@600 gives 600).
  SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-540}
  RECOMPUTE_LAYERS=${RECOMPUTE_LAYERS:-0}  # N > 0: recompute the first N layers of each stage

  # --- the launcher ----------------------------------------------------------------------------
  IMAGE=${IMAGE:-$REPO/megatron-m2.sqsh}  # enroot image (docker/README.md), or a registry path
  CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$DATA_ROOT:$DATA_ROOT,$OUT_ROOT:$OUT_ROOT}
  CONTAINER_WORKDIR=${CONTAINER_WORKDIR:-/workspace/megatron_m2}
  MODULES=${MODULES:-}  # LAUNCHER=module: e.g. 'cuda/12.8 nccl'
  VENV=${VENV:-}        # LAUNCHER=module: a virtualenv with megatron_m2 installed
  TORCHRUN=${TORCHRUN:-torchrun}

  # --- m2-pretrain flags, by group ---------------------------------------------------------------
  local model_args=(--flavor "$FLAVOR")
  local parallel_args=(
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
    --use-distributed-optimizer --distributed-timeout-minutes "$TIMEOUT_MIN"
  )
  local precision_args
  case $PRECISION in
    bf16) precision_args=(--bf16) ;;
    # FP8 needs Hopper or newer and the Transformer Engine layers (docs/training.md).
    fp8) precision_args=(--bf16 --fp8-format hybrid --fp8-recipe delayed --transformer-impl te) ;;
    *) m2_die "PRECISION=$PRECISION: use bf16 or fp8" ;;
  esac
  local train_args=(
    --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS" --seed "$SEED"
  )
  local optim_args=(
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine
    --weight-decay "$WEIGHT_DECAY" --clip-grad "$CLIP_GRAD"
  )
  local recompute_args=()
  if ((RECOMPUTE_LAYERS > 0)); then
    # 'block' keeps the first VL layer's input (read by the backbone ITC heads) un-recomputed
    # as long as N <= the backbone layers on that stage; m2-pretrain checks it.
    recompute_args=(--recompute-granularity full --recompute-method block
      --recompute-num-layers "$RECOMPUTE_LAYERS")
  fi
  local itc_args=(--itc-heads "$ITC_HEADS")
  if [[ -n $ITC_AGGREGATE_NODES ]]; then
    itc_args+=(--itc-aggregate-nodes "$ITC_AGGREGATE_NODES")
  else
    itc_args+=(--itc-group-size "$ITC_GROUP_SIZE")
  fi
  if [[ $ITC_ACCUM == 1 ]]; then
    itc_args+=(--itc-accumulate-features)
  fi
  local data_prefixes
  read -ra data_prefixes <<<"$DATA"
  local data_args=(
    --data-path "${data_prefixes[@]}" --tokenizer-model "$TOKENIZER" --split "$SPLIT"
    --caption-lang "$CAPTION_LANG" --num-workers "$NUM_WORKERS"
  )
  local eval_args=()
  if [[ -n $VALID_DATA ]]; then
    eval_args=(--valid-data-path "$VALID_DATA" --eval-interval "$EVAL_INTERVAL"
      --eval-max-samples "$EVAL_MAX_SAMPLES")
  fi
  local ckpt_args=(--save "$SAVE" --save-interval "$SAVE_INTERVAL" --exit-signal-handler)
  if [[ -n $LOAD ]]; then
    ckpt_args+=(--load "$LOAD")
  elif [[ -f $SAVE/latest_checkpointed_iteration.txt ]] || compgen -G "$SAVE/iter_*/meta.json" >/dev/null; then
    # A requeued or resubmitted job continues where it stopped (a lost tracker included:
    # m2-pretrain then takes the newest complete iter_N and says so).
    ckpt_args+=(--load "$SAVE")
  fi
  local log_args=(
    --log-interval "$LOG_INTERVAL" --log-json "$SAVE/log.jsonl" --tensorboard-dir "$SAVE/tensorboard"
  )

  # --- torchrun (one per node) under srun ------------------------------------------------------
  local torchrun_args=(
    --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$RDZV_PORT" --rdzv-id "$JOB_ID"
    --max-restarts 0
  )
  local srun_args=(
    --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1
  )
  # The save folder (it holds the checkpoints and the JSON log) exists before any rank starts;
  # m2-pretrain also creates its output folders and checks that they are writable.
  local setup=("mkdir -p $(printf %q "$SAVE")"  # commands run in this shell before srun
    "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT")
  case $LAUNCHER in
    pyxis)
      srun_args+=(--container-image="$IMAGE" --container-workdir="$CONTAINER_WORKDIR")
      if [[ -n $CONTAINER_MOUNTS ]]; then
        srun_args+=(--container-mounts="$CONTAINER_MOUNTS")
      fi
      ;;
    module)
      # The environment (modules, venv) is set up here and passed on by srun; the ranks run
      # from the checkout (python -m adds the working directory to sys.path).
      srun_args+=(--chdir="$REPO")
      if [[ -n $MODULES ]]; then
        setup+=("module load $MODULES")
      fi
      if [[ -n $VENV ]]; then
        setup+=("source $(printf %q "$VENV/bin/activate")")
      fi
      ;;
    *) m2_die "LAUNCHER=$LAUNCHER: use pyxis or module" ;;
  esac
  local cmd=(
    srun "${srun_args[@]}"
    "$TORCHRUN" "${torchrun_args[@]}" -m megatron_m2.pretrain
    "${model_args[@]}" "${parallel_args[@]}" "${precision_args[@]}" "${train_args[@]}"
    "${optim_args[@]}" "${recompute_args[@]}" "${itc_args[@]}" "${data_args[@]}"
    "${eval_args[@]}" "${ckpt_args[@]}" "${log_args[@]}" "$@"
  )

  local itc_desc="k=$ITC_GROUP_SIZE DP ranks"
  if [[ -n $ITC_AGGREGATE_NODES ]]; then
    itc_desc="$ITC_AGGREGATE_NODES node(s)"
  fi
  printf '# m2 %s %s via %s: %d node(s) x %d GPUs%s; TP%d PP%d DP%d; ITC group %s (%d DP ranks per node); MBS %d GBS %d\n' \
    "$FLAVOR" "$PRECISION" "$LAUNCHER" "$NNODES" "$GPUS_PER_NODE" "$fake" "$TP" "$PP" "$DP" \
    "$itc_desc" "$dp_per_node" "$MBS" "$GBS" >&2

  if [[ $DRY_RUN == 1 ]]; then
    local s
    for s in "${setup[@]}"; do printf '%s\n' "$s"; done
    m2_print_cmd "${cmd[@]}"
    exit 0
  fi
  mkdir -p "$SAVE" || m2_die "cannot create the save folder SAVE=$SAVE"
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=$SHUTDOWN_TIMEOUT
  if [[ $LAUNCHER == module && -n $MODULES ]]; then
    command -v module >/dev/null 2>&1 || m2_die "MODULES is set but there is no 'module' command"
    local mods
    read -ra mods <<<"$MODULES"
    module load "${mods[@]}"
  fi
  if [[ $LAUNCHER == module && -n $VENV ]]; then
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
  fi
  m2_print_cmd "${cmd[@]}"  # into the job log, for the record
  exec "${cmd[@]}"
}
