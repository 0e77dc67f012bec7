"""tandem.bench: what measures Tandem. Nothing in tandem.runtime, tandem.models or tandem.kernels imports it.

- latency: `tandem bench`, the latency study (Tandem beside transformers and the bandwidth floor, one run);
  latency_report writes its bench.json / summary.txt / latency.png; profiling its torch.profiler views
- targets: the latency targets' table, read from the study's JSON files
- cli: registers `tandem bench` with the `tandem` command (entry-point group "tandem.commands")
- test_kernels + kernels_report: kernel micro-benchmarks (pytest-benchmark) and their table
- compile_check: every Triton kernel compiled for sm_90 on a machine without a GPU
- soak: many small mixed requests on the tiny models, for leaks and failures (not in CI)
- gpu.sh: the one prepared GPU run; RESULTS.md: the measured figures
"""
