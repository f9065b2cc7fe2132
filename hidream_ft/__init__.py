"""hidream-ft: distributed full fine-tuning and LoRA for HiDream-O1-Image."""

import logging


def _quiet_torchao_import() -> None:
    """transformers imports torchao (installed for fp8 bases) in every process. On a CPU-only or older CUDA torch
    it logs that its optional CUDA extensions are missing, and torch warns about its enum registrations: expected,
    harmless, and not actionable by a user, so these records alone are dropped."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").addFilter(
        lambda record: "is an Enum subclass and is now natively supported" not in record.getMessage())


_quiet_torchao_import()
