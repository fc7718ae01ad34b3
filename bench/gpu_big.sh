#!/usr/bin/env bash
# PART=big of bench/gpu.sh (sourced by it, after its settings): the largest CodeGen shape that the
# memory planner accepts for this GPU and this host (16B, 6B, 2B in that order), trained from
# scratch (the fixture's tokenizer keeps CodeGen's 51200 embedding rows) with the optimizer
# offloaded and --gradient_checkpointing, bf16, block $BLOCK, micro 1,
# $BIG_STEPS steps: tokens/s and peak GPU memory next to the planner's total, and DeepSpeed ZeRO-2
# + offload on the 2B shape (the anchor's largest; without activation checkpointing, as the
# anchor runs it) in the same call.
BIG_CONFIGS=${BIG_CONFIGS:-codegen-16B codegen-6B codegen-2B}
BIG_STEPS=${BIG_STEPS:-3}
BIG_DT=${BIG_DT:-bf16}
"$PY" - "$WORK/data.txt" <<'PYEOF'
import random, sys
random.seed(0)
words = ["".join(random.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(random.randint(2, 9))) for _ in range(5000)]
open(sys.argv[1], "w").write("".join(f"def {random.choice(words)}({', '.join(random.sample(words, 3))}):\n    return {' + '.join(random.sample(words, 4))}\n" for _ in range(20000)))
PYEOF
echo '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memory": true}}, "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"}}' > "$WORK/ds_big.json"
BIG=none BIG_TPS=- BIG_MEM=- BIG_PLAN=- BIG_REFUSED=""
for config in $BIG_CONFIGS; do
  args=(--config_name "$config" $NUM_GPUS --tokenizer_name .gpu/fixtures/tiny --train_file "$WORK/data.txt" --output_dir "/tmp/big-$config"
    --overwrite_output_dir --do_train --device "$DEVICE" --"$BIG_DT" --deepspeed "$WORK/ds_big.json" --gradient_checkpointing
    --block_size "$BLOCK" --per_device_train_batch_size 1 --gradient_accumulation_steps 1 --max_steps "$BIG_STEPS"
    --logging_steps 1 --save_steps 0 --completion_eval_positions 0)
  section "6. $config: the planner"
  if ! "$BIN/coordinator" estimate "${args[@]}" > "$WORK/estimate-$config.txt" 2>&1; then
    cat "$WORK/estimate-$config.txt"
    BIG_REFUSED+="$config refused by the planner; "
    continue
  fi
  cat "$WORK/estimate-$config.txt"
  BIG_PLAN=$(planned_mib "${args[@]}")
  section "6. $config: training $BIG_STEPS steps"
  sample_start "$WORK/mem-big.txt"
  timeout 420 "$BIN/coordinator" train "${args[@]}" > "$WORK/big-$config.log" 2>&1; rc=$?
  BIG_MEM=$(sample_stop "$WORK/mem-big.txt")
  tail -4 "$WORK/big-$config.log"
  if [ $rc = 0 ]; then
    BIG=$config
    BIG_TPS=$(tail -1 "/tmp/big-$config/metrics.jsonl" | "$PY" -c 'import json,sys; print(round(json.loads(sys.stdin.read())["tokens_per_second"]))')
    break
  fi
  BIG_REFUSED+="$config failed (rc $rc, see big-$config.log); "
done
rm -rf /tmp/big-*
DS_BIG="- -"
if [ "$ANCHOR" = 1 ]; then
  section "7. DeepSpeed $BIG_DT, codegen-2B shape"
  sample_start "$WORK/mem-ds-big.txt"
  bash .gpu/anchor/run.sh "$PWD/.gpu/anchor/wheels" "300 ds --size 2b --dtype $BIG_DT --micro 1 --ga 1 --steps $BIG_STEPS --warmup 1" > "$WORK/ds-big.log" 2>&1
  DS_BIG_MEM=$(sample_stop "$WORK/mem-ds-big.txt")
  cat "$WORK/ds-big.log"
  DS_BIG=$(grep RESULT "$WORK/ds-big.log" | sed 's/RESULT //' | "$PY" -c 'import json,sys; r=json.loads(sys.stdin.read()); print(round(r["tokens_per_s"]), "%.1f" % r["peak_gpu_gib"])' 2>/dev/null || echo "failed -")
fi
echo
{
echo "largest shape trained on one $DEVICE with offload + checkpointing: $BIG (${BIG_REFUSED:-none refused})"
echo "| run (block $BLOCK, micro 1, $BIG_DT) | tokens/s | peak GPU MiB (nvidia-smi) | planner MiB | torch max allocated GiB |"
echo "|---|---|---|---|---|"
echo "| zerotune $BIG, ZeRO-2 + CPU offload + gradient checkpointing | $BIG_TPS | ${BIG_MEM:--} | $BIG_PLAN | - |"
set -- $DS_BIG
[ "$ANCHOR" = 1 ] && echo "| DeepSpeed ZeRO-2 + CPU offload, codegen-2B shape | $1 | ${DS_BIG_MEM:--} | - | $2 |"
} | tee "$OUT/summary-$PART.md"
