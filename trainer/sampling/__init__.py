"""Sampling pairs from the policy: batched generation with the nucleus draw, the sampler thread,
hot reload of committed versions, and the vLLM backend."""
