"""`tandem eval`: the pair's policies scored on a dataset, with their output tokens and latency (run.py); the
data formats (data.py), the benchmarks' scorers (scoring.py) and the report (report.py)."""
