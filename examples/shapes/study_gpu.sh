#!/usr/bin/env bash
# The compute study of the Harmon-Shapes model card ("Training", "More compute on a GPU"): does pair binding come with
# several times the recipe's compute? Three runs of examples/shapes/train.py share one GPU, each with the shipped
# autoencoder (--vae default), and each ends with ShapesEval (n=50, the card's seed):
#   x1      the recipe as shipped, on the GPU (the control: the same numbers as on 2 CPU cores, within noise?)
#   x10     2.5x the steps of every stage at 4x the batch (about 10x the pictures seen)
#   x10-l6  the same with a 6-layer LLM instead of 3
# Usage: examples/shapes/study_gpu.sh WORK_DIR [DEADLINE_SECONDS] [RUNS]   (RUNS: default "x1 x10 x10-l6")
# Runs still going at the deadline (default 480 s) are stopped; their logs are kept. A summary table ends the output.
set -u
work=${1:?usage: study_gpu.sh WORK_DIR [DEADLINE_SECONDS]}
deadline=${2:-480}
runs=${3:-x1 x10 x10-l6}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$work"
# USE_HUB_KERNELS=0: transformers would fetch Hub kernels for a model on a GPU, which offline fails
export HF_HUB_OFFLINE=1 USE_HUB_KERNELS=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
gpu=(--vae default --set use_cpu=false --set dataloader_num_workers=2 --set save_strategy='"no"' --eval 50 --threads 4)
big=(--steps-scale 2.5 --set per_device_train_batch_size=128)
declare -A extra=([x1]="" [x10]="${big[*]}" [x10-l6]="${big[*]} --model-set llm.num_hidden_layers=6")

start=$SECONDS
pids=()
for run in $runs; do
    [[ -v extra[$run] ]] || { echo "unknown run $run (x1, x10, x10-l6)"; exit 2; }
    # shellcheck disable=SC2086  # extra[] holds several words
    python3 "$here/train.py" --out "$work/$run" "${gpu[@]}" ${extra[$run]} >"$work/$run.log" 2>&1 &
    pids+=($!)
done

while (( SECONDS - start < deadline )); do
    running=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    (( running )) || break
    sleep 5
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && { echo "deadline: stopping $pid"; pkill -P "$pid"; kill "$pid"; }; done
wait
echo "study: $((SECONDS - start)) s"

python3 - "$work" <<'PY'
import json
import sys
from pathlib import Path

work = Path(sys.argv[1])
print(f"{'run':8} {'minutes':>7} {'single':>6} {'pair':>6} {'count':>6} {'colour':>6} {'shape':>6} {'u-count':>7} {'u-pos':>6}")
for run in ("x1", "x10", "x10-l6"):
    report, result = work / run / "train_report.json", work / run / "shapes_eval.json"
    if not result.is_file():
        stages = {p.parent.name: json.loads(p.read_text())["global_step"] for p in (work / run).glob("stage*/trainer_state.json")}
        print(f"{run:8} not finished; stages done: {stages}")
        continue
    seconds = json.loads(report.read_text())["seconds"]
    g, u = (json.loads(result.read_text())[k] for k in ("generation", "understanding"))
    row = [g["single"]["accuracy"], g["pair"]["accuracy"], g["count"]["accuracy"]]
    row += [u[k]["accuracy"] for k in ("colour", "shape", "count", "position")]
    print(f"{run:8} {sum(seconds.values()) / 60:7.1f} " + " ".join(f"{v:6.2f}" for v in row), seconds)
PY
