#!/usr/bin/env bash
# specdec's Triton kernels under Nsight Compute: a few launches each, after warm-up, with the
# sections that say whether a kernel is bound by memory bandwidth or compute.
#   profiling/ncu.sh [drafter] [batch]      -> profiling/results/ncu_<drafter>_b<batch>.ncu-rep
set -euo pipefail
drafter=${1:-ngram}
batch=${2:-8}
out=profiling/results/ncu_${drafter}_b${batch}
ncu --kernel-name regex:"_tree_attention_kernel|_merge_splits_kernel|_verify_kernel" --launch-skip 60 --launch-count 6 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
    --force-overwrite -o "$out" \
    "${PYTHON:-python3}" profiling/decode_once.py --drafter "$drafter" --batch "$batch" --max-new-tokens 32
ncu --import "$out.ncu-rep" --page details --csv > "$out.csv"
echo "wrote $out.ncu-rep and $out.csv"
