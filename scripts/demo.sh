#!/usr/bin/env bash
# The main job on a small built-in default: turn this repository's own source into a dataset,
# train a tiny CodeGen from scratch on CPU for a few minutes (eval perplexity falls as it goes),
# complete a prompt taken from the project's code, then serve the model and send it the request
# the FauxPilot VS Code extension sends.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-300}

echo
echo "== 1. files2jsonl: this repository's source -> $OUT-data.jsonl"
mkdir -p "$(dirname "$OUT")"
target/debug/coordinator files2jsonl . "$OUT-data.jsonl" --exclude 'runs/**'

echo
echo "== 2. train a tiny CodeGen from scratch ($STEPS steps on CPU)"
target/debug/coordinator train \
    --config_name tiny --train_tokenizer 2048 \
    --train_file "$OUT-data.jsonl" --validation_split_percentage 10 \
    --output_dir "$OUT" --overwrite_output_dir \
    --do_train --do_eval --device cpu \
    --block_size 256 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
    --learning_rate 2e-3 --warmup_ratio 0.05 --lr_scheduler_type cosine --weight_decay 0.01 \
    --max_steps "$STEPS" --logging_steps 25 --eval_steps 50 --save_steps 100 --save_total_limit 2

echo
echo "== 3. complete a prompt from the project's code"
target/debug/worker generate --model "$OUT" --max_new_tokens 48 \
    --prompt $'impl Sampler {\n    /// Optimizer steps in one pass over the data (ragged micro-batches and steps dropped).\n    pub fn steps_per_epoch(&self) -> usize {\n'

echo
echo "== 4. serve it (worker serve) and send the FauxPilot extension's request"
log=$(mktemp)
target/debug/worker serve --model "$OUT" --port 0 --device cpu 2>"$log" &
server=$!
trap 'kill "$server" 2>/dev/null || true; rm -f "$log"' EXIT
until grep -q " at http://" "$log"; do
    kill -0 "$server" 2>/dev/null || { cat "$log"; exit 1; }
    sleep 0.1 # the server is loading the model
done
base=$(sed -n 's|.* at \(http://[^ ]*\)/v1 .*|\1|p' "$log")
head -1 "$log"
body='{"model":"fastertransformer","prompt":"    pub fn steps_per_epoch(&self) -> usize {\n        ","max_tokens":200,"temperature":0.1,"stop":["\n"]}'
echo "POST $base/v1/engines/codegen/completions $body"
curl -sS "$base/v1/engines/codegen/completions" -H "Authorization: Bearer dummy" -H "Content-Type: application/json" -d "$body"
echo
kill -TERM "$server"
wait "$server"
