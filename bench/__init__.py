"""tandem.bench: what measures Tandem. Nothing in tandem.runtime, tandem.models or tandem.kernels imports it.

- latency: `tandem bench`, the latency study (Tandem beside transformers and the bandwidth floor, one run): its
  method and run_benchmark. Its parts, a module each: decode (the floor, per-token latency, the stop check, the
  batch step), concurrency, prefill (prefill and vision), profiling, policies; beside them settings (what a run
  measures), build (the models and the inputs), timing (medians, the progress bar); latency_report writes
  bench.json / summary.txt / latency.png
- targets: the latency targets' table, read from the study's JSON files
- cli: registers `tandem bench` with the `tandem` command (entry-point group "tandem.commands")
- test_kernels + kernels_report: kernel micro-benchmarks (pytest-benchmark) and their table
- compile_check: every Triton kernel compiled for sm_90 on a machine without a GPU
- soak: many small mixed requests on the tiny models, for leaks and failures (not in CI)
- gpu.sh: the one prepared GPU run; RESULTS.md: the measured figures
"""
