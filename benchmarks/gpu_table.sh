#!/usr/bin/env bash
# The GPU measurements docs/performance.md still lacks ("GPU", "Open points"), as one prepared call for a session
# that is lent a GPU for a few minutes: the diffusion head's step by rows, eager and compiled (the launch-bound part),
# then Harmon-1.5B shapes at 512 px (4 MAR rounds, reduced from 64) and Harmon-0.5B shapes at 256 px (64 rounds),
# bf16, batch 1 and 8. Random weights, nothing downloaded. Every step has its own time limit, so one slow step
# cannot eat the others' time; what finished is kept.
# Usage: benchmarks/gpu_table.sh OUT_DIR [DEVICE] [SET]
#   DEVICE: cuda (default) or cpu; SET: full (default) or smoke (tiny shapes and few repeats: checks the script itself
#   on any machine in about a minute). Results: OUT_DIR/*.json and *.log, and a summary at the end of the output.
set -u
out=${1:?usage: gpu_table.sh OUT_DIR [DEVICE] [SET]}
device=${2:-cuda}
set_name=${3:-full}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
# USE_HUB_KERNELS=0: transformers would fetch Hub kernels for the Qwen2 layers on a GPU, which fails offline
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

case $set_name in
    full)
        head_args=(--config 1.5b --dtypes bf16 --rows 8 64 512 --repeats 5)
        gen_15b=(--configs 1.5b --dtypes bf16 --size 512 --rounds 4 --batch-sizes 1 8 --repeats 3)
        gen_05b=(--configs 0.5b --dtypes bf16 --rounds 64 --batch-sizes 1 8 --repeats 3)
        limits=(60 120 180 180)  # 9 minutes in all: one 10-minute device call
        ;;
    smoke)
        head_args=(--config tiny --dtypes fp32 --rows 2 8 --steps 5 --repeats 1)
        gen_15b=(--configs tiny --dtypes fp32 --rounds 4 --batch-sizes 1 2 --repeats 1 --no-breakdown)
        gen_05b=(--configs tiny --dtypes fp32 --rounds 2 --batch-sizes 1 --repeats 1 --no-breakdown)
        limits=(60 60 60 60)
        ;;
    *)
        echo "unknown SET $set_name (full or smoke)"
        exit 2
        ;;
esac

status=0
step() {  # step NAME LIMIT COMMAND...: run with a time limit, log to OUT_DIR/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 12 "$out/$name.log"
    if ((rc != 0)); then
        echo "!! $name ended with status $rc (124 = time limit)"
        status=1
    fi
}

[[ $device == cuda ]] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$out/env.txt"
step head "${limits[0]}" python3 "$here/bench_head.py" "${head_args[@]}" --device "$device"
step head_compiled "${limits[1]}" python3 "$here/bench_head.py" "${head_args[@]}" --device "$device" --compile
step generate_1.5b "${limits[2]}" python3 "$here/bench_generate.py" "${gen_15b[@]}" --device "$device" \
    --json "$out/generate_1.5b.json"
step generate_0.5b "${limits[3]}" python3 "$here/bench_generate.py" "${gen_05b[@]}" --device "$device" \
    --json "$out/generate_0.5b.json"
echo "gpu_table: results in $out (status $status)"
exit $status
