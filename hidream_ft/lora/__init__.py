"""Everything LoRA: training targets, the canonical adapter type, key styles, file formats and the
sampling-time hooks."""
