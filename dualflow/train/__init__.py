"""The end-to-end job: a small DeepSeek-V3-style MoE model trained with DualPipe, expert parallelism and FP8."""
