#!/usr/bin/env bash
# One pass over what needs a CUDA machine, short enough for a borrowed one (about 8 minutes on an H100):
#
#     bash benchmarks/gpu_check.sh ../shared/data/cifar100-6 runs/gpu-check [STEP ...]
#
# STEP: speed, train-ratio, kinds-cuda, selfeval-speed, torchvision, tests, kinds-cpu (default: speed,
# train-ratio, kinds-cuda, tests, in this order):
# - speed: bench_speed on the GPU (MLP, CNN, ViT on 50,000 random images; with and without torch.compile):
#   training images/s, achieved FLOP/s and share of a measured bfloat16 matmul peak; then the wall time of the
#   six-class CNN run on DATA after start-up;
# - train-ratio: bench_train for the CNN on the GPU: Model.fit against a bare loop on the same tensors;
# - kinds-cuda: bench_kinds on the GPU (MLP, CNN, ViT; seed 0): training with --device cuda, evaluation
#   on the CPU;
# - selfeval-speed: bench_selfeval on that machine's CPU, one thread (nothing else running: the judges'
#   overhead batched and one image at a time; every-tap and logits-only judges; untrained weights);
# - torchvision: check_torchvision.py (resnet18 as a module parent), where torchvision is installed;
# - tests: the test suite with the GPU visible (--device auto trains there), on the torch installed;
# - kinds-cpu: the MLP and CNN of kinds-cuda on the same machine's CPU, all its cores: the GPU's
#   speed-up, measured on one machine.
# Each step has its own time limit and log in OUT; a step that fails does not stop the others.
set -uo pipefail
DATA=${1:?usage: gpu_check.sh DATA OUT [STEP ...]}
OUT=${2:?usage: gpu_check.sh DATA OUT [STEP ...]}
shift 2
STEPS=" ${*:-speed train-ratio kinds-cuda tests} "
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it, keep its log, show its end
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    echo "== $name"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "   exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL:-14}" "$OUT/$name.log" | cut -c1-200
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
    nproc
} 2>&1 | tee "$OUT/machine.log"

TAIL=16 step speed 240 python benchmarks/bench_speed.py --images 50000 --kinds mlp,cnn,vit --device cuda --compile \
    --run-data "$DATA" --json "$OUT/speed.json"
step train-ratio 60 python benchmarks/bench_train.py --data "$DATA" --kind cnn --epochs 4 --repeats 3 --device cuda
step kinds-cuda 150 python benchmarks/bench_kinds.py --data "$DATA" --kinds mlp,cnn,vit --seeds 0 --device cuda \
    --out "$WORK/kinds-cuda"
TAIL=24 step selfeval-speed 200 bash -c "
    python benchmarks/bench_selfeval.py --config configs/cifar100-6-selfeval.toml --data '$DATA' --threads 1 \
        --images 2048 --single 300 --repeats 7 &&
    python benchmarks/bench_selfeval.py --config configs/cifar100-6-selfeval.toml --data '$DATA' --threads 1 \
        --images 2048 --single 300 --repeats 7 --logits-only &&
    python benchmarks/bench_selfeval.py --config configs/cifar100-6-cnn-selfeval.toml --data '$DATA' --threads 1 \
        --images 1024 --single 50 --repeats 5"
step torchvision 60 python benchmarks/check_torchvision.py --data "$DATA" --device cuda
PARALLEL=$(python -c "import xdist" 2>/dev/null && echo "-n 12")  # pytest-xdist, where installed
step tests 180 env BRANCHING_REAL_DATA="$DATA" OMP_NUM_THREADS=1 python -m pytest -q -x $PARALLEL -p no:cacheprovider
step kinds-cpu 100 python benchmarks/bench_kinds.py --data "$DATA" --kinds mlp,cnn --seeds 0 --device cpu \
    --out "$WORK/kinds-cpu"
rm -rf "$WORK"
