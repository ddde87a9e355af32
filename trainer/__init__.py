"""Everything that touches the model: loading, sampling, judges, DPO, adapters."""
