#!/usr/bin/env bash
# One pass over what needs a CUDA machine, short enough for a borrowed one (about 8 minutes on an H100):
#
#     bash benchmarks/gpu_check.sh ../shared/data/cifar100-6 runs/gpu-check
#
# 1. bench_kinds on the GPU (MLP, CNN, ViT; seed 0): training with --device cuda, evaluation on the CPU;
# 2. the same MLP and CNN on the same machine's CPU, all its cores: the GPU's speed-up in one run;
# 3. bench_selfeval on that machine's CPU, one thread (a quiet machine: judge overhead, batched and one
#    image at a time, every-tap judges and logits-only judges, untrained weights);
# 4. check_torchvision.py (resnet18 as a module parent), where torchvision is installed;
# 5. the test suite with the GPU visible (--device auto trains there), on whatever torch is installed.
# Each step has its own time limit and log in OUT; a step that fails does not stop the others.
set -uo pipefail
DATA=${1:?usage: gpu_check.sh DATA OUT}
OUT=${2:?usage: gpu_check.sh DATA OUT}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it, keep its log, show its end
    local name=$1 limit=$2 start=$SECONDS
    shift 2
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

step kinds-cuda 150 python benchmarks/bench_kinds.py --data "$DATA" --kinds mlp,cnn,vit --seeds 0 --device cuda \
    --out "$WORK/kinds-cuda"
TAIL=24 step selfeval-speed 120 bash -c "
    python benchmarks/bench_selfeval.py --config configs/cifar100-6-selfeval.toml --data '$DATA' --threads 1 \
        --images 2048 --single 300 --repeats 7 &&
    python benchmarks/bench_selfeval.py --config configs/cifar100-6-selfeval.toml --data '$DATA' --threads 1 \
        --images 2048 --single 300 --repeats 7 --logits-only &&
    python benchmarks/bench_selfeval.py --config configs/cifar100-6-cnn-selfeval.toml --data '$DATA' --threads 1 \
        --images 1024 --single 50 --repeats 5"
step torchvision 60 python benchmarks/check_torchvision.py --data "$DATA" --device cuda
step tests 150 env BRANCHING_REAL_DATA="$DATA" python -m pytest -q -x -n 8 -p no:cacheprovider
step kinds-cpu 100 python benchmarks/bench_kinds.py --data "$DATA" --kinds mlp,cnn --seeds 0 --device cpu \
    --out "$WORK/kinds-cpu"
rm -rf "$WORK"
