"""Export HiDream-O1 LoRAs and fine-tunes for inference: PEFT, ComfyUI, kohya, musubi; import, merge, stack.

    adapter = load_adapter("runs/my-lora")                       # run dir, step-N/, PEFT dir or any LoRA file
    write_lora(adapter, "comfyui", "my-lora.safetensors")
    merge_checkpoint(base, "merged/", loras=[(adapter, 0.75)])   # official HF layout, streamed
    model = attach_adapter(load_model(base), adapter)            # unmerged, for sampling

Formats and key examples: docs/export.md. CLI: ``python -m hidream_ft.convert --help``.
"""

from hidream_ft.lora.adapter import (
    LoraAdapter, LoraModule, attach_adapter, check_fits, module_regex, peft_lora_config, stack_adapters,
)
from hidream_ft.lora.errors import ConvertError
from hidream_ft.lora.formats import lora_metadata, read_lora_file, read_peft_dir, write_lora
from hidream_ft.lora.keys import STYLES, WRITABLE_STYLES, KeyStyle, parse_lora_keys
from hidream_ft.convert.merge import comfyui_key, merge_checkpoint, weight_shapes
from hidream_ft.convert.sources import FullWeights, TensorSource, load_adapter, load_source

__all__ = [
    "ConvertError", "FullWeights", "KeyStyle", "LoraAdapter", "LoraModule", "STYLES", "TensorSource",
    "WRITABLE_STYLES", "attach_adapter", "check_fits", "comfyui_key", "load_adapter", "load_source",
    "lora_metadata", "merge_checkpoint", "module_regex", "parse_lora_keys", "peft_lora_config", "read_lora_file",
    "read_peft_dir", "stack_adapters", "weight_shapes", "write_lora",
]
