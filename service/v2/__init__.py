"""The Open Inference Protocol (KServe V2) over REST, on the fast path."""
