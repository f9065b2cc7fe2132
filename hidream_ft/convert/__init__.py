"""Export, merge and inspect HiDream-O1 LoRAs and fine-tunes, over the adapter type of :mod:`hidream_ft.lora`.

    adapter = load_adapter("runs/my-lora")                       # run dir, step-N/, PEFT dir or any LoRA file
    write_lora(adapter, "comfyui", "my-lora.safetensors")        # hidream_ft.lora: PEFT, ComfyUI, kohya, musubi
    merge_checkpoint(base, "merged/", loras=[(adapter, 0.75)])   # official HF layout, streamed

Formats and key examples: docs/export.md. CLI: ``python -m hidream_ft.convert --help``.
"""

from hidream_ft.convert.merge import merge_checkpoint, weight_shapes
from hidream_ft.convert.sources import FullWeights, TensorSource, load_adapter, load_source

__all__ = [
    "FullWeights", "TensorSource", "load_adapter", "load_source", "merge_checkpoint", "weight_shapes",
]
