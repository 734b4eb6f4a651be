#!/usr/bin/env bash
# The GPU rows of bench/: the trainer (before, ours, Trainer + peft) and where the local
# engine's decode time goes, on a device machine, in one run. From the repo root, with two
# ignored folders carried:
#   .whl  wheels the machine lacks (transformers, peft, apscheduler, tzlocal, sqlite-utils...)
#   .gpu  tok/ (SmolLM2's tokenizer files) and data/irc-rust.jsonl
# The machine reaches no hub: the models are random-init at Qwen2.5-0.5B shape. Writes $OUT.
# ENGINE=1 also runs bench/engine.py (hot swap, batching, loop lag; ~3 min).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__,
peft.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
export GUILDTUNE_BENCH_DATA=$PWD/.gpu/data GUILDTUNE_BENCH_CACHE=/tmp/gtb
common=(--device cuda --shape qwen2.5-0.5b --tokenizer .gpu/tok --threads 8 --max-heldout 200)
timeout 140 python3 bench/trainer.py "${common[@]}" --steps 60 --variants before,ours,trainer \
    --out "$OUT/trainer-gpu.json" 2>&1 | grep -v Warning | tail -7
timeout 90 python3 bench/trainer.py "${common[@]}" --steps 30 --batch-size 32 \
    --variants ours,trainer --out "$OUT/trainer-gpu-b32.json" 2>&1 | grep -v Warning | tail -5
timeout 100 python3 bench/engine_profile.py 2>&1 | grep -v Warning | tee "$OUT/engine-profile.txt" \
    | tail -40
if [ "${ENGINE:-0}" = 1 ]; then
    timeout 200 python3 bench/engine.py --device cuda --out "$OUT/engine-gpu.json" 2>&1 | tail -25
fi
