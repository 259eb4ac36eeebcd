#!/usr/bin/env bash
# A short speculative decode under Nsight Systems, with specdec's NVTX ranges
# (draft, verify_forward, observe, accept, commit, tree_attention, verify_kernel).
#   profiling/nsys.sh [drafter] [batch]      -> profiling/results/nsys_<drafter>_b<batch>.nsys-rep
set -euo pipefail
drafter=${1:-ngram}
batch=${2:-1}
out=profiling/results/nsys_${drafter}_b${batch}
export SPECDEC_NVTX=1
nsys profile --trace=cuda,nvtx,osrt --cuda-graph-trace=node --capture-range=none \
    --force-overwrite=true -o "$out" \
    "${PYTHON:-python3}" profiling/decode_once.py --drafter "$drafter" --batch "$batch" --max-new-tokens 64
nsys stats --report nvtx_sum,cuda_gpu_kern_sum --format table "$out.nsys-rep" | tee "$out.txt"
