"""`make bench` (python -m bench.run): ml-api against in-run baselines; not a test suite."""
