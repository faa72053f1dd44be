"""loraforge: governed, evaluated LoRA adapters on open models."""

__version__ = "0.1.0"
