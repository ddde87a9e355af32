"""Training: the config, the DPO-family losses, one optimizer step, the loop and its modes,
on-policy examples, and multi-process training under accelerate."""
