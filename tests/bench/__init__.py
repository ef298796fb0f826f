"""`make bench`: a benchmark, not a test suite (pytest collects nothing here)."""
