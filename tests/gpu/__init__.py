"""GPU paths: CPU-checkable parts of them (test_placement) and the CUDA tier (test_cuda, -m gpu)."""
