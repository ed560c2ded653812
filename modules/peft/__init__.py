"""Parameter-efficient fine-tuning as functions on a built model: LoRA, RSLoRA, DoRA, QLoRA."""
