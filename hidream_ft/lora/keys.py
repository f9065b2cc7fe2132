"""LoRA key styles of the tools that write or load HiDream-O1 adapters, and the module paths they name.

Every style names a LoRA'd linear layer by its module path in the official Hugging Face model
(``model.language_model.layers.0.self_attn.q_proj``), written either in full or relative to the diffusion
model (without the leading ``model.``), with dots kept or turned into underscores, behind a prefix:

    peft      base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight
    comfyui   diffusion_model.language_model.layers.0.self_attn.q_proj.lora_A.weight   (+ .alpha; ai-toolkit: none)
    kohya     lora_unet_language_model_layers_0_self_attn_q_proj.lora_down.weight     (+ .alpha)
    musubi    lora_unet_model_language_model_layers_0_self_attn_q_proj.lora_down.weight (+ .alpha)
    diffusers transformer.language_model.layers.0.self_attn.q_proj.lora_A.weight
    onetrainer  lora_transformer_language_model_layers_0_self_attn_q_proj.lora_down.weight (+ .alpha)
    diffsynth   model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight

Underscored names are ambiguous on their own (``self_attn`` vs ``self.attn``), so they are resolved against
the architecture's linear layers, generalised over layer and block numbers (:class:`ModuleIndex`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from torch import nn

from hidream_ft.errors import listing
from hidream_ft.lora.errors import ConvertError

SLOT = "#"  # stands for a layer / block number in a module template
DIFFUSION_ROOT = "model."  # the diffusion model inside the HF model; relative styles name paths below it
SAMPLE_MODULE = "model.language_model.layers.0.self_attn.q_proj"
KINDS = ("lora", "dora", "loha", "lokr")  # the adapter kinds (docs/export.md, "Adapter kinds")


def template_of(path: str) -> str:
    return ".".join(SLOT if part.isdigit() else part for part in path.split("."))


class ModuleIndex:
    """The linear layers of the architecture, as templates with numbered path segments generalised."""

    def __init__(self, linear_paths: Iterable[str]):
        self.templates = frozenset(template_of(path) for path in linear_paths)
        self._flat_patterns = [
            (re.compile("_".join(r"(\d+)" if part == SLOT else re.escape(part) for part in t.split("."))), t)
            for t in sorted(self.templates)
        ]

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModuleIndex":
        return cls(name for name, module in model.named_modules() if isinstance(module, nn.Linear))

    def contains(self, path: str) -> bool:
        return template_of(path) in self.templates

    def lookup(self, name: str, flat: bool) -> str | None:
        """The HF module path spelled exactly ``name`` (dotted, or with every "." written as "_"), if any."""
        if not flat:
            return name if self.contains(name) else None
        for pattern, template in self._flat_patterns:
            match = pattern.fullmatch(name)
            if match:
                numbers = iter(match.groups())
                return ".".join(next(numbers) if part == SLOT else part for part in template.split("."))
        return None

    def resolve(self, name: str, flat: bool) -> str | None:
        """The HF module path named by ``name``, written in full or relative to the diffusion model."""
        root = DIFFUSION_ROOT.replace(".", "_") if flat else DIFFUSION_ROOT
        return self.lookup(name, flat) or self.lookup(root + name, flat)


@lru_cache(maxsize=1)
def architecture_index() -> ModuleIndex:
    """Linear-layer templates of HiDream-O1 (see :func:`_toy_model`)."""
    return ModuleIndex.from_model(_toy_model())


@lru_cache(maxsize=1)
def convolution_index() -> ModuleIndex:
    """The convolutions of HiDream-O1 (the ViT's Conv3d patch embedding), which some trainers LoRA too."""
    return ModuleIndex(name for name, module in _toy_model().named_modules()
                       if isinstance(module, nn.modules.conv._ConvNd))


@lru_cache(maxsize=1)
def _toy_model() -> nn.Module:
    """HiDream-O1 built on the meta device at toy sizes: the module tree does not depend on the sizes (two of
    each numbered block suffice), and a toy config builds in milliseconds."""
    from transformers import Qwen3VLConfig

    from hidream_ft.model.loading import build_meta_model

    config = Qwen3VLConfig(
        text_config={
            "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rope_scaling": {"rope_type": "default", "mrope_interleaved": True, "mrope_section": [4, 2, 2]},
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1],
        },
    )
    return build_meta_model(config, tms_token_id=0)


def module_regex(paths: Sequence[str]) -> str:
    r"""A PEFT ``target_modules`` regex that fully matches these module paths and no others. A path segment
    ``#`` stands for any layer number. Paths that differ only in their one layer number share an alternative,
    in the order the paths come, e.g. for two projections of layers 0-2 and a head:

        ^(model\.language_model\.layers\.(?:0|1|2)\.(self_attn\.(q_proj|v_proj))|model\.x_embedder\.proj1)$

    Paths with no or several numbered segments are listed one by one.
    """
    numbers: dict[str, dict[str, None]] = {}  # template with one number -> its numbers, in order (an ordered set)
    for path in paths:
        template = template_of(path).split(".")
        if template.count(SLOT) == 1:
            numbers.setdefault(".".join(template), {})[path.split(".")[template.index(SLOT)]] = None
    # Each alternative: an escaped literal path (None), or a numbered head with {first tail segment: [rest]}.
    alternatives: dict[str, dict[str, dict[str, None]] | None] = {}
    for path in paths:
        template = template_of(path)
        if template not in numbers:
            alternatives[re.escape(path)] = None
            continue
        parts = template.split(".")
        slot = parts.index(SLOT)
        found = numbers[template]
        layer = r"\d+" if SLOT in found else "(?:" + "|".join(sorted(found, key=int)) + ")"
        head = r"\.".join(map(re.escape, parts[:slot])) + r"\." + layer
        tail = parts[slot + 1:]
        branches = alternatives.setdefault(head, {})
        branches.setdefault(tail[0] if tail else "", {})[".".join(tail[1:])] = None
    rendered = []
    for head, branches in alternatives.items():
        if branches is None:
            rendered.append(head)
        else:
            rendered.append(_then_one_of(head, [_then_one_of(re.escape(first), [re.escape(rest) for rest in rests])
                                                if first else "" for first, rests in branches.items()]))
    return "^(" + "|".join(rendered) + ")$"


def _then_one_of(prefix: str, suffixes: list[str]) -> str:
    """``prefix`` followed by "." and one of the (regex) suffixes; an empty suffix allows ``prefix`` alone."""
    options = [suffix for suffix in suffixes if suffix]
    if not options:
        return prefix
    return prefix + r"\.(" + "|".join(options) + ")" + ("?" if len(options) < len(suffixes) else "")


DOWN, UP, ALPHA = "down", "up", "alpha"
_PART = re.compile(
    r"^(?P<stem>.+?)\.(?:(?P<peft>lora_[AB])(?:\.default)?\.weight|(?P<kohya>lora_down|lora_up)\.weight|alpha)$"
)
_PART_NAMES = {"lora_A": DOWN, "lora_B": UP, "lora_down": DOWN, "lora_up": UP}


def is_lora_key(key: str) -> bool:
    return _PART.match(key) is not None


# Tensors of the other adapter kinds in single files (LyCORIS names; ai-toolkit's "lokr" networks among them).
_OTHER_KINDS = {"LoKr": re.compile(r"\.lokr_(w[12](_[ab])?|t[12])$"), "LoHa": re.compile(r"\.hada_(w[12]_[ab]|t[12])$"),
                "DoRA": re.compile(r"\.dora_scale$")}


@dataclass(frozen=True)
class KeyStyle:
    name: str
    prefix: str
    flat: bool  # "." in the module path written as "_"
    relative: bool  # the path is written without its leading "model." (relative to the diffusion model)
    kohya_names: bool  # lora_down / lora_up rather than lora_A / lora_B
    # Where the scale lives: an .alpha tensor "always" or "if_not_rank" (scale = alpha / rank), "config"
    # (PEFT: adapter_config.json) or "none" (the tool trains with alpha = rank, i.e. scale 1).
    alpha: str
    adapter_infix: str = ""  # PEFT adapter name inside the key, e.g. ".default"
    writable: bool = False
    kinds: tuple[str, ...] = ("lora",)  # the adapter kinds its files hold (LoHa, LoKr: LyCORIS tensor names)

    def module_name(self, path: str) -> str | None:
        """The name this style gives the module at HF path ``path``; None if the style cannot express it."""
        if self.relative:
            if not path.startswith(DIFFUSION_ROOT):
                return None
            path = path[len(DIFFUSION_ROOT):]
        return self.prefix + (path.replace(".", "_") if self.flat else path)

    def key(self, path: str, part: str) -> str:
        name = self.module_name(path)
        if name is None:
            raise ConvertError(f"the {self.name} style cannot name {path}: it only covers modules under model.")
        if part == ALPHA:
            return f"{name}.alpha"
        suffix = {DOWN: "lora_down", UP: "lora_up"} if self.kohya_names else {DOWN: "lora_A", UP: "lora_B"}
        return f"{name}.{suffix[part]}{self.adapter_infix}.weight"

    def examples(self) -> list[str]:
        parts = [DOWN, UP] + ([ALPHA] if self.alpha in ("always", "if_not_rank") else [])
        return [self.key(SAMPLE_MODULE, part) for part in parts]


STYLES = {
    style.name: style
    for style in [
        KeyStyle("peft", "base_model.model.", flat=False, relative=False, kohya_names=False, alpha="config",
                 writable=True, kinds=KINDS),
        KeyStyle("comfyui", "diffusion_model.", flat=False, relative=True, kohya_names=False, alpha="if_not_rank",
                 writable=True, kinds=KINDS),
        # LoHa / LoKr as LyCORIS writes them. No DoRA: its dora_scale means one thing to LyCORIS and another to
        # ComfyUI (see formats.comfyui_dora_scale), and both read these files.
        KeyStyle("kohya", "lora_unet_", flat=True, relative=True, kohya_names=True, alpha="always", writable=True,
                 kinds=("lora", "loha", "lokr")),
        KeyStyle("musubi", "lora_unet_", flat=True, relative=False, kohya_names=True, alpha="always", writable=True,
                 kinds=("lora", "loha", "lokr")),
        KeyStyle("diffusers", "transformer.", flat=False, relative=True, kohya_names=False, alpha="none"),
        KeyStyle("onetrainer", "lora_transformer_", flat=True, relative=True, kohya_names=True, alpha="always"),
        KeyStyle("diffsynth", "", flat=False, relative=False, kohya_names=False, alpha="none",
                 adapter_infix=".default"),
    ]
}
WRITABLE_STYLES = [name for name, style in STYLES.items() if style.writable]


def _style_of_stem(stem: str, index: ModuleIndex) -> tuple[KeyStyle, str]:
    """(style, module name without prefix) for a key stem; kohya and musubi share their prefix and differ in
    whether the path keeps its leading ``model``."""
    for style in STYLES.values():
        if style.prefix and stem.startswith(style.prefix):
            name = stem[len(style.prefix):]
            if style.name == "kohya" and any(i.lookup(name, flat=True) is not None
                                             for i in (index, convolution_index())):
                return STYLES["musubi"], name
            return style, name
    return STYLES["diffsynth"], stem


def unknown_style_message(where: str, keys: Iterable[str]) -> str:
    examples = "; ".join(f"{style.name}: {', '.join(style.examples())}" for style in STYLES.values())
    return (f"{where}: not a LoRA in any known key style (first keys: {listing(keys, 4)}). "
            f"Expected keys like — {examples}")


@dataclass
class ParsedKeys:
    style: KeyStyle
    parts: dict[str, dict[str, str]]  # HF module path -> {down/up/alpha: original key}
    skipped: list[str]  # convolutions with a LoRA (e.g. musubi-tuner's conv_dim), which adapters cannot hold


def parse_lora_keys(keys: Iterable[str], where: str, index: ModuleIndex | None = None) -> ParsedKeys:
    """Detect the key style and map every key to (module path, part); raise listing what does not fit."""
    index = index or architecture_index()
    keys = list(keys)
    for kind, pattern in _OTHER_KINDS.items():
        found = [key for key in keys if pattern.search(key)]
        if found:
            raise ConvertError(f"{where}: a {kind} adapter ({listing(found, 4)}), which cannot be read from a single "
                               "file: those are read as plain LoRAs (lora_A/lora_B or lora_down/lora_up); every "
                               "adapter kind is read from a PEFT folder, a run or a checkpoint")
    by_style: dict[str, list[tuple[str, str, str]]] = defaultdict(list)
    not_lora = []
    for key in keys:
        match = _PART.match(key)
        if match is None:
            not_lora.append(key)
            continue
        style, name = _style_of_stem(match["stem"], index)
        kind = match["peft"] or match["kohya"]
        part = _PART_NAMES[kind] if kind else ALPHA
        by_style[style.name].append((key, name, part))
    if not by_style:
        raise ConvertError(unknown_style_message(where, keys))
    style_name = max(by_style, key=lambda name: len(by_style[name]))
    style = STYLES[style_name]
    unmatched = not_lora + [key for name, found in by_style.items() if name != style_name for key, _, _ in found]
    parts: dict[str, dict[str, str]] = defaultdict(dict)
    duplicates, skipped = [], {}
    for key, name, part in by_style[style_name]:
        path = index.resolve(name, style.flat)
        convolution = convolution_index().resolve(name, style.flat) if path is None else None
        if convolution is not None:
            skipped[convolution] = None
        elif path is None:
            unmatched.append(key)
        elif part in parts[path]:
            duplicates.append(f"{parts[path][part]} and {key}")
        else:
            parts[path][part] = key
    if duplicates:
        raise ConvertError(f"{where}: several keys for the same LoRA weight: {listing(duplicates, 4)}")
    if unmatched:
        raise ConvertError(
            f"{where}: {len(unmatched)} keys do not match the {style.name} LoRA style of this file or name no "
            f"linear layer of HiDream-O1: {listing(unmatched)} (expected keys like {', '.join(style.examples())})"
        )
    incomplete = [f"{path} (has only {', '.join(sorted(found))})" for path, found in parts.items()
                  if DOWN not in found or UP not in found]
    if incomplete:
        raise ConvertError(f"{where}: LoRA modules without both down (A) and up (B) weights: {listing(incomplete)}")
    return ParsedKeys(style, dict(parts), list(skipped))
