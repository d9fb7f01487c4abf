"""Examples that run from a checkout (not part of the installed ``llama_vision`` package)."""
