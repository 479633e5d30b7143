"""kdfast's pytest-benchmark suites (bench_<op>.py) and the report script (report.py)."""
