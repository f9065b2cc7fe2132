"""HiDream-O1-Image: the network, its input format (patches, pixels, token layouts, conditioning images) and
its loading from the official layout."""

import importlib

# Submodules load on first use (PEP 562), so that the configuration can read the patch geometry without
# importing torch and transformers.
_EXPORTS = {
    "CheckpointError": "loading", "HiDreamO1": "hidream", "LayoutBatch": "layout", "SampleLayout": "layout",
    "SpecialTokens": "layout", "build_t2i_layout": "layout", "collate_layouts": "layout",
    "layout_from_ids": "layout", "load_hf_config": "loading", "load_model": "loading",
    "load_tokenizer": "loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
