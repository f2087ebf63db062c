"""LoRA adapters and steering vectors: formats, validation, registries."""
