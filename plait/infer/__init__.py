"""Inference on a plain (unsharded) model: sampling with a KV cache, greedy or top-k/top-p."""
