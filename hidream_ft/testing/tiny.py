"""Write a tiny random HiDream-O1 checkpoint in exactly the official on-disk layout.

    python -m hidream_ft.testing.tiny OUT_DIR [--seed 0]

Same file names, config schema, tensor names and special tokens as the real 8B checkpoint, at a size that
builds in milliseconds: used by the tests and the CPU demo. The weights are random (every head included),
so the model's outputs depend on all of its inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3VLConfig

from hidream_ft.cli import entry_point
from hidream_ft.model.hidream import HiDreamO1

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<|boi_token|>", "<|bor_token|>", "<|eor_token|>", "<|bot_token|>", "<|tms_token|>",
]

# Qwen-style chat template: string content, or a list of {"type": "image"} / {"type": "text"} parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "a photo of a red circle on a blue background", "a green square", "a yellow triangle over a gradient",
    "user assistant image picture drawing painting portrait landscape of the with and in on at",
    "change the colour make it brighter add a hat remove the background turn into a sketch",
    "the quick brown fox jumps over the lazy dog 0123456789 , . ! ?",
]


def tiny_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config_dict(tokenizer: PreTrainedTokenizerFast, text_layers: int = 3) -> dict:
    """A config.json in the official (transformers 4.57) schema, at a tiny size."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": "qwen3_vl",
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "text_config": {
            "model_type": "qwen3_vl_text",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "max_position_embeddings": 262144,
            "rope_theta": 5000000.0,
            "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [4, 2, 2]},
            "initializer_range": 0.02,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "tie_word_embeddings": False,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": 2,
            "hidden_size": 32,
            "hidden_act": "gelu_pytorch_tanh",
            "intermediate_size": 64,
            "num_heads": 2,
            "in_channels": 3,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": 64,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0, 1],
            "initializer_range": 0.02,
        },
    }


def preprocessor_config(patch_size: int = 16, merge_size: int = 2) -> dict:
    return {
        "image_processor_type": "Qwen2VLImageProcessorFast",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "rescale_factor": 1 / 255,
        "patch_size": patch_size,
        "temporal_patch_size": 2,
        "merge_size": merge_size,
        "size": {"shortest_edge": 4096, "longest_edge": 16777216},
    }


def save_sharded(state: dict[str, torch.Tensor], out: Path, num_shards: int) -> None:
    """safetensors shards named like the official release, plus the index."""
    keys = sorted(state)
    chunks = [keys[i::num_shards] for i in range(num_shards)]
    weight_map, total = {}, 0
    for i, chunk in enumerate(chunks, 1):
        name = f"model-{i:05d}-of-{num_shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in chunk}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
        total += sum(state[k].numel() * state[k].element_size() for k in chunk)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny_checkpoint(out_dir: str | Path, seed: int = 0, text_layers: int = 3, num_shards: int = 2) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(str(out))
    config_dict = tiny_config_dict(tokenizer, text_layers)
    (out / "config.json").write_text(json.dumps(config_dict, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2))
    torch.manual_seed(seed)
    model = HiDreamO1(Qwen3VLConfig.from_dict(config_dict), tms_token_id=tokenizer.convert_tokens_to_ids("<|tms_token|>"))
    with torch.no_grad():  # the official zero/xavier head inits would hide input dependence in tests
        for name, param in model.named_parameters():
            if not name.endswith("norm.weight") and "norm1" not in name and "norm2" not in name:
                param.normal_(0.0, 0.02 if param.dim() > 1 else 0.01)
    save_sharded(model.state_dict(), out, num_shards)
    return out


@entry_point
def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m hidream_ft.testing.tiny", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (≥ 2 for DeepStack)")
    args = parser.parse_args(argv)
    print(write_tiny_checkpoint(args.out_dir, seed=args.seed, text_layers=args.layers))


if __name__ == "__main__":
    sys.exit(main())
