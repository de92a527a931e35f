"""fastchat-plora: PeriodicLoRA fine-tuning (Meng et al. 2024) in a FastChat-style pipeline."""

__version__ = "0.1.0"
