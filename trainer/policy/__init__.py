"""The policy model and how token sequences go through it: loading (and the GGUF cache), LoRA,
adapter versions on disk, prompt rendering and padding, sequence log-probs, the shared prompt
prefix. Sampling and training both build on these."""
