#!/usr/bin/env bash
# Check the CUDA path end to end on a GPU machine. Run it from the repository root:
#
#   bash scripts/gpu_check.sh                        # every GPU of this machine (GPUS=2 picks how many)
#   GPU_CHECK_DEVICE=cpu bash scripts/gpu_check.sh   # dry run on CPU: gloo, fp32, no compile, tiny sizes
#
# 1. Builds tiny offline data (scripts/make_demo_data.py) and a random CLIP tower (scripts/make_random_clip.py).
# 2. Trains under torchrun (nccl on CUDA), bf16 autocast and --compile: 1-pretrain_vlm.py, stopped by SIGTERM
#    after step STOP_AT (the trainer's MINIMIND_TEST_SIGNAL hook) and continued with --resume, then
#    2-sft_vlm.py from its output. Checks that each stage's loss falls and that it ends at the planned step.
# 3. Measures training samples/s (steady state, cold and warm feature cache) and peak GPU memory of the 27M
#    (512x8) and 109M (768x16) configs on generated data (benchmarks/train.py: one GPU, eager, ours only).
# Prints a table and writes it as JSON to $GPU_CHECK_OUT (default: $WORK/gpu_check.json). Files go to
# $GPU_CHECK_DIR (default: a new temporary directory); each command's output is in $WORK/*.log.
set -euo pipefail

cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${GPU_CHECK_DEVICE:-cuda}
WORK=${GPU_CHECK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/minimind-gpu-check.XXXXXX")}
mkdir -p "$WORK"
OUT_JSON=${GPU_CHECK_OUT:-$WORK/gpu_check.json}
STEP_TIMEOUT=${STEP_TIMEOUT:-1800}  # seconds per command: a hang fails the check instead of blocking it
export HF_HUB_OFFLINE=1 WANDB_MODE=offline

if [[ $DEVICE == cuda ]]; then
    found=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
    if [[ $found -lt 1 ]]; then
        echo "gpu_check: torch sees no CUDA device (GPU_CHECK_DEVICE=cpu runs the dry run)" >&2
        exit 1
    fi
    GPUS=${GPUS:-$found}
    N_TRAIN=2000 BATCH=32 PRE_STEPS=200 STOP_AT=100 SFT_STEPS=100 LOG_INTERVAL=10 WORKERS=2
    DIM=256 MODEL=(--dim 256 --n_layers 4 --n_heads 8 --n_kv_heads 4)
    TRAIN=(--device cuda --dtype bfloat16 --compile)
    BENCH_SIZES=(27m 109m)
    BENCH=(--device cuda --dtype bfloat16 --records 320 1600 --batch_size 32 --num_workers 4)
elif [[ $DEVICE == cpu ]]; then
    GPUS=${GPUS:-2}
    N_TRAIN=96 BATCH=4 PRE_STEPS=16 STOP_AT=8 SFT_STEPS=16 LOG_INTERVAL=1 WORKERS=0
    DIM=64 MODEL=(--dim 64 --n_layers 2 --n_heads 4 --n_kv_heads 2)
    TRAIN=(--device cpu --dtype float32)
    BENCH_SIZES=(tiny)
    BENCH=(--device cpu --dtype float32 --quick)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo}
else
    echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, not '$DEVICE'" >&2
    exit 1
fi

fail() { echo "gpu_check: FAILED: $*" >&2; exit 1; }
# run LOG CMD...: runs CMD with a time limit, output shown and kept in $WORK/LOG; returns CMD's exit status.
# (--foreground: Ctrl-C still reaches CMD; on a timeout torchrun gets SIGTERM and stops its workers.)
run() {
    local log=$WORK/$1; shift
    echo "+ $*" | tee "$log"
    set +e
    timeout --foreground --kill-after=60 "$STEP_TIMEOUT" "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    set -e
    return "$rc"
}
TORCHRUN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$GPUS")
# check_log NAME STEPS: the run's log ends at STEPS and its loss falls (records without "loss" are skipped)
check_log() {
    "$PYTHON" - "$WORK/out/${1}_log.jsonl" "$WORK/out/${1}.json" "$2" <<'EOF'
import json, sys
log, sidecar, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
recs = [r for r in map(json.loads, open(log)) if "loss" in r]
k = max(1, min(5, len(recs) // 4))
first, last = sum(r["loss"] for r in recs[:k]) / k, sum(r["loss"] for r in recs[-k:]) / k
final = json.load(open(sidecar))["step"]
print(f"  {log}: {len(recs)} loss records, steps {recs[0]['step']}..{recs[-1]['step']}, loss {first:.3f} -> "
      f"{last:.3f} (mean of the first and last {k}), checkpoint at step {final}")
if final != steps or recs[-1]["step"] != steps:
    sys.exit(f"expected the run to end at step {steps}")
if not last < 0.9 * first:
    sys.exit(f"the loss did not fall by 10%: {first:.3f} -> {last:.3f}")
EOF
}
compiled() {  # compiled LOG: with --compile the run reports at least one compiled graph
    [[ " ${TRAIN[*]} " != *" --compile "* ]] && return 0
    grep -Eq "torch.compile: [1-9][0-9]* graph" "$WORK/$1" || fail "$1: no 'torch.compile: N graph(s) compiled'"
}

name=${DIM}_vlm  # the checkpoints' names: {dim}_vlm_pretrain, {dim}_vlm_sft
echo "gpu_check: device $DEVICE, $GPUS process(es), work dir $WORK"
t0=$SECONDS

# -- 1. data and tower ------------------------------------------------------------------------------------------
run data.log "$PYTHON" scripts/make_demo_data.py --out_dir "$WORK/data" --n_train "$N_TRAIN" --n_eval 8 \
    --eval_images_dir "" || fail "make_demo_data.py"
run tower.log "$PYTHON" scripts/make_random_clip.py --out_dir "$WORK/random-clip" || fail "make_random_clip.py"

# -- 2. both stages under torchrun, with a SIGTERM stop and --resume in stage 1 ----------------------------------
COMMON=(--images_dir "$WORK/data/images" --vision_model "$WORK/random-clip" --out_dir "$WORK/out" "${MODEL[@]}"
        --batch_size "$BATCH" --learning_rate 2e-3 --max_seq_len 160 --num_workers "$WORKERS"
        --log_interval "$LOG_INTERVAL" --save_interval 50 "${TRAIN[@]}")
PRE=(1-pretrain_vlm.py --data_path "$WORK/data/pretrain.jsonl" --init_from none --max_steps "$PRE_STEPS" "${COMMON[@]}")
t_pre=$SECONDS
if MINIMIND_TEST_SIGNAL="TERM:$STOP_AT" run pretrain_stopped.log "${TORCHRUN[@]}" "${PRE[@]}"; then
    fail "pretraining was sent SIGTERM after step $STOP_AT but exited 0"
fi
grep -q "stopped by SIGTERM after step $STOP_AT:" "$WORK/pretrain_stopped.log" ||
    fail "pretraining did not stop cleanly after step $STOP_AT (see $WORK/pretrain_stopped.log)"
compiled pretrain_stopped.log
run pretrain_resumed.log "${TORCHRUN[@]}" "${PRE[@]}" --resume || fail "pretraining --resume (see $WORK/pretrain_resumed.log)"
grep -q "resumed from .*: step $STOP_AT," "$WORK/pretrain_resumed.log" || fail "the resumed run did not start at step $STOP_AT"
compiled pretrain_resumed.log
pre_s=$((SECONDS - t_pre))
check_log "${name}_pretrain" "$PRE_STEPS" || fail "pretraining"

t_sft=$SECONDS
run sft.log "${TORCHRUN[@]}" 2-sft_vlm.py --data_path "$WORK/data/sft.jsonl" --max_steps "$SFT_STEPS" "${COMMON[@]}" ||
    fail "SFT (see $WORK/sft.log)"
grep -q "${name}_pretrain" "$WORK/sft.log" || fail "SFT did not start from the pretrained checkpoint"
compiled sft.log
sft_s=$((SECONDS - t_sft))
check_log "${name}_sft" "$SFT_STEPS" || fail "SFT"

# -- 3. speed and memory of the real configs ----------------------------------------------------------------------
for size in "${BENCH_SIZES[@]}"; do
    run "bench_$size.log" "$PYTHON" benchmarks/train.py --size "$size" "${BENCH[@]}" \
        --workdir "$WORK/bench_$size" --out "$WORK/bench_$size.json" || fail "benchmarks/train.py --size $size"
done

# -- table and JSON -----------------------------------------------------------------------------------------------
"$PYTHON" - "$OUT_JSON" "$DEVICE" "$GPUS" "$WORK" "$name" "$pre_s" "$sft_s" "$((SECONDS - t0))" "${BENCH_SIZES[@]}" <<'EOF'
import json, sys
import torch
out, device, gpus, work, name, pre_s, sft_s, wall_s, *sizes = sys.argv[1:]
res = {"device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
       "processes": int(gpus), "torch": torch.__version__, "work_dir": work, "pipeline": {}, "benchmark": {},
       "wall_s": int(wall_s)}
for stage, secs in (("pretrain", pre_s), ("sft", sft_s)):
    recs = [r for r in map(json.loads, open(f"{work}/out/{name}_{stage}_log.jsonl")) if "loss" in r]
    res["pipeline"][stage] = {"steps": recs[-1]["step"], "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"],
                              "wall_s": int(secs)}
    peaks = [r["peak_gpu_memory_mb"] for r in recs if "peak_gpu_memory_mb" in r]  # logged by newer trainers
    if peaks:
        res["pipeline"][stage]["peak_gpu_memory_mb"] = max(peaks)
print(f"\ngpu_check: all checks passed on {res['gpu'] or 'CPU'} ({device}, {gpus} process(es), torch {res['torch']})")
for stage, p in res["pipeline"].items():
    peak = f", peak GPU memory {p['peak_gpu_memory_mb']:.0f} MB (rank 0)" if "peak_gpu_memory_mb" in p else ""
    print(f"  {stage:<8} {p['steps']} steps, loss {p['first_loss']:.3f} -> {p['last_loss']:.3f}, {p['wall_s']} s{peak}")
print(f"\n{'config':<7}{'batch':>6}{'samples/s warm':>16}{'samples/s cold':>16}{'of peak':>9}{'peak GPU MB':>13}")
for size in sizes:
    b = json.load(open(f"{work}/bench_{size}.json"))
    res["benchmark"][size] = b
    w, cold = b["runs"]["ours-warm"], b["runs"]["ours-cold"]
    peak = max(w.get("peak_gpu_memory_mb", 0), cold.get("peak_gpu_memory_mb", 0))
    print(f"{size:<7}{b['batch_size']:>6}{w['samples_per_s']:>16.1f}{cold['samples_per_s']:>16.1f}"
          f"{w['share_of_peak']:>9.1%}{peak:>13.0f}")
print(f"(1-pretrain_vlm.py, one process, eager, autocast {b['autocast']}; steady state between two record counts; "
      f"warm: features read from the cache, cold: encoded as the epoch needs them; share of the measured matmul "
      f"peak)\nwall time {res['wall_s']} s; JSON: {out}")
with open(out, "w") as f:
    f.write(json.dumps(res, indent=2) + "\n")
EOF
