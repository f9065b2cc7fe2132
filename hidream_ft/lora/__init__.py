"""Everything LoRA: the canonical adapter type, key styles, file formats, sampling-time hooks and (in
:mod:`hidream_ft.lora.targets`) what a training run adapts. Formats and key examples: docs/export.md."""

import contextlib
import sys


def _import_peft_without_bitsandbytes() -> None:
    """Import peft while bitsandbytes looks absent. peft imports bitsandbytes whenever it is installed, which
    costs seconds and prints warnings about GPU kernels, for quantised layers that no adapter here uses
    (the NF4 base, hidream_ft.model.quantize, imports bitsandbytes itself)."""
    if "peft" in sys.modules or "bitsandbytes" in sys.modules:
        return
    sys.modules["bitsandbytes"] = None  # makes both `import bitsandbytes` and find_spec report it missing
    try:
        from peft.import_utils import is_bnb_4bit_available, is_bnb_available

        # peft asks again when it injects adapters; its answers are cached, so they stay "absent".
        is_bnb_available()
        is_bnb_4bit_available()
    finally:
        del sys.modules["bitsandbytes"]


_import_peft_without_bitsandbytes()


def let_peft_see_bitsandbytes() -> None:
    """Undo the hiding above for a model whose base holds bitsandbytes 4-bit linears, so that PEFT wraps them
    in its own 4-bit LoRA layer (imported by PEFT only now)."""
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available

    is_bnb_available.cache_clear()
    is_bnb_4bit_available.cache_clear()


@contextlib.contextmanager
def peft_without_torchao():
    """PEFT imports torchao (seconds, and warnings about GPU kernels) whenever it injects LoRA layers and torchao
    is installed; unless a quantized base has imported it already, it looks absent meanwhile."""
    if "torchao" in sys.modules:
        yield
        return
    sys.modules["torchao"] = None
    try:
        yield
    finally:
        del sys.modules["torchao"]


from hidream_ft.lora.adapter import (
    AdapterModule, LohaModule, LokrModule, LoraAdapter, LoraModule, attach_adapter, check_fits, parse_lora_spec,
    peft_lora_config, stack_adapters,
)
from hidream_ft.lora.errors import ConvertError
from hidream_ft.lora.formats import (
    adapter_from_peft_state, describe, lora_metadata, read_lora_file, read_peft_dir, write_lora, write_peft_dir,
)
from hidream_ft.lora.hooks import lora_applied, lora_label
from hidream_ft.lora.keys import KINDS, STYLES, WRITABLE_STYLES, KeyStyle, module_regex, parse_lora_keys

__all__ = [
    "AdapterModule", "ConvertError", "KINDS", "KeyStyle", "LohaModule", "LokrModule", "LoraAdapter", "LoraModule",
    "STYLES", "WRITABLE_STYLES", "adapter_from_peft_state",
    "attach_adapter", "check_fits", "describe", "lora_applied", "lora_label", "lora_metadata", "module_regex",
    "parse_lora_keys", "parse_lora_spec", "peft_lora_config", "read_lora_file", "read_peft_dir", "stack_adapters",
    "write_lora", "write_peft_dir",
]
