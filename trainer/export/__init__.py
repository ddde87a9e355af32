"""Exports: a PEFT adapter, a merged model, the preference dataset, and GGUF for llama.cpp."""
