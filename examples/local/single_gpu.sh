#!/usr/bin/env bash
# Train M2-Encoder on one GPU in BF16 (tiny by default, or FLAVOR=0.4b) on the bundled bilingual
# emoji demo set, evaluate held-out image<->text retrieval in English and Chinese, save a
# checkpoint, a loss curve and TensorBoard logs.
#
#   bash examples/local/single_gpu.sh
#   FLAVOR=0.4b ITERS=2000 OUT=runs/gpu_0.4b bash examples/local/single_gpu.sh
#   GPU=3 DATA_PATH=/data/m2/train VALID_DATA=none TOKENIZER=/data/m2/tokenizer.model \
#     FLAVOR=0.4b bash examples/local/single_gpu.sh
#   DRY_RUN=1 bash examples/local/single_gpu.sh      # print the command, run nothing
#
# Any extra arguments are passed to m2-pretrain (e.g. --fp8-format hybrid --fp8-recipe delayed
# --transformer-impl te on Hopper). On a CPU box use examples/local/demo_cpu.sh instead.
set -euo pipefail
cd "$(dirname "$0")/../.."

FLAVOR=${FLAVOR:-tiny}
case $FLAVOR in
  tiny) def_mbs=64 def_lr=3e-3 def_warmup=50 ;;
  0.4b) def_mbs=64 def_lr=5e-4 def_warmup=100 ;;
  *) echo "single_gpu.sh: FLAVOR=$FLAVOR: use tiny or 0.4b (larger flavors: examples/slurm/)" >&2
     exit 2 ;;
esac
MBS=${MBS:-$def_mbs}
GBS=${GBS:-$MBS}
LR=${LR:-$def_lr}
WARMUP=${WARMUP:-$def_warmup}
ITERS=${ITERS:-500}
GPU=${GPU:-${CUDA_VISIBLE_DEVICES:-0}}
OUT=${OUT:-runs/gpu_$FLAVOR}
PYTHON=${PYTHON:-python}
DATA=${DATA:-data/emoji_demo}
DATA_PATH=${DATA_PATH:-$DATA/train}
VALID_DATA=${VALID_DATA:-$DATA/validation}  # 'none': no evaluation
TOKENIZER=${TOKENIZER:-$DATA/tokenizer.model}
NUM_WORKERS=${NUM_WORKERS:-4}
DRY_RUN=${DRY_RUN:-0}

model_args=(--flavor "$FLAVOR" --bf16)
data_args=(
  --data-path "$DATA_PATH" --tokenizer-model "$TOKENIZER" --caption-lang balanced
  --randaugment none --num-workers "$NUM_WORKERS"
)
train_args=(
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS"
  --lr "$LR" --lr-warmup-iters "$WARMUP" --lr-decay-style cosine --weight-decay 0.05
  --clip-grad 1.0
)
eval_args=()
if [[ $VALID_DATA != none ]]; then
  eval_args=(--valid-data-path "$VALID_DATA" --eval-interval 100)
fi
log_args=(
  --log-interval 20 --save "$OUT" --log-json "$OUT/log.jsonl" --tensorboard-dir "$OUT/tb"
)
cmd=(
  "$PYTHON" -m torch.distributed.run --nproc-per-node 1 -m megatron_m2.pretrain
  "${model_args[@]}" "${data_args[@]}" "${train_args[@]}" "${eval_args[@]}" "${log_args[@]}" "$@"
)

if [[ $DRY_RUN == 1 ]]; then
  printf -v line '%q ' env CUDA_VISIBLE_DEVICES="$GPU" "${cmd[@]}"
  printf '%s\n' "${line% }"
  exit 0
fi
export CUDA_VISIBLE_DEVICES=$GPU
# Without a GPU the trainer would quietly fall back to CPU (gloo); say so instead.
"$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' ||
  { echo "single_gpu.sh: no CUDA GPU visible (GPU=$GPU); on CPU use examples/local/demo_cpu.sh" >&2
    exit 2; }
mkdir -p "$OUT"
exec "${cmd[@]}"
