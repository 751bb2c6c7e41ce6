#!/usr/bin/env bash
# Train the tiny M2-Encoder on the bundled bilingual emoji demo set on a CPU box (2 gloo
# processes, data parallel), evaluate held-out image<->text retrieval in English and Chinese
# (validation during training, the test split at the end, with a picture of top-5 results),
# save a checkpoint, a loss curve and TensorBoard logs.
#
#   bash examples/local/demo_cpu.sh
#   NPROC=2 TP=2 ITERS=200 OUT=runs/tp2 bash examples/local/demo_cpu.sh
#
# Any extra arguments are passed to m2-pretrain.
set -euo pipefail
cd "$(dirname "$0")/../.."

NPROC=${NPROC:-2}
TP=${TP:-1}
PP=${PP:-1}
ITERS=${ITERS:-1000}
OUT=${OUT:-runs/demo}
PYTHON=${PYTHON:-python}
DATA=${DATA:-data/emoji_demo}

model_args=(--flavor tiny --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP")
data_args=(
  --data-path "$DATA/train" --valid-data-path "$DATA/validation"
  --tokenizer-model "$DATA/tokenizer.model" --caption-lang balanced --randaugment none
  --num-workers 1 --trim-text-padding
)
train_args=(
  --micro-batch-size 32 --global-batch-size 64 --train-iters "$ITERS"
  --lr 3e-4 --lr-warmup-iters 100 --lr-decay-style cosine --weight-decay 0.2 --clip-grad 1.0
)
log_args=(
  --eval-interval 250 --log-interval 20 --save "$OUT" --log-json "$OUT/log.jsonl"
  --tensorboard-dir "$OUT/tb"
)

mkdir -p "$OUT"
"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_m2.pretrain \
  "${model_args[@]}" "${data_args[@]}" "${train_args[@]}" "${log_args[@]}" "$@"

# The test split: concepts that neither training nor the validation evaluations above (which
# the recipe was tuned on) have seen. Writes the table, its JSON and a picture of held-out
# queries with their top-5 images per language.
echo "== test split: $DATA/test"
"$PYTHON" -m megatron_m2.cli.evaluate --load "$OUT" --task retrieval --data "$DATA/test" \
  --device cpu --no-progress --output "$OUT/test_retrieval.json" \
  --retrieval-examples "$OUT/test_retrieval_examples.png" --retrieval-examples-queries 5
