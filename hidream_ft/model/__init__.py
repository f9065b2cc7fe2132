"""HiDream-O1-Image: the network, its loading from the official layout, token layouts and LoRA targets."""

from hidream_ft.model.hidream import HiDreamO1
from hidream_ft.model.layout import (
    LayoutBatch, SampleLayout, SpecialTokens, build_t2i_layout, collate_layouts, layout_from_ids,
)
from hidream_ft.model.loading import CheckpointError, load_hf_config, load_model, load_tokenizer

__all__ = [
    "CheckpointError", "HiDreamO1", "LayoutBatch", "SampleLayout", "SpecialTokens", "build_t2i_layout",
    "collate_layouts", "layout_from_ids",
    "load_hf_config", "load_model", "load_tokenizer",
]
