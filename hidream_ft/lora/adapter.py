"""The canonical LoRA: per linear layer (by its official HF module path) the two factors and an alpha.

Whatever file it came from, an adapter changes the weight of module ``p`` by

    ΔW = scale · B · A,   scale = alpha / rank,   A = ``down`` [rank, in],  B = ``up`` [out, rank]

which is the kohya / ComfyUI convention. PEFT's rsLoRA scale alpha_peft / √rank is stored as
alpha = alpha_peft · √rank, so every writer and the merge need only this one formula.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from hidream_ft.errors import listing
from hidream_ft.lora.errors import ConvertError
from hidream_ft.lora.keys import DOWN, STYLES, UP, module_regex


@dataclass
class LoraModule:
    down: torch.Tensor  # A (PEFT lora_A, kohya lora_down): [rank, in_features]
    up: torch.Tensor  # B (PEFT lora_B, kohya lora_up): [out_features, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]


def lora_module(path: str, down: torch.Tensor, up: torch.Tensor, alpha: float | None, where: str) -> LoraModule:
    """A checked :class:`LoraModule`; ``alpha`` None means alpha = rank (scale 1)."""
    if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
        raise ConvertError(f"{where}: {path}: lora_A {list(down.shape)} and lora_B {list(up.shape)} are not the "
                           "two factors of one linear LoRA ([rank, in] and [out, rank])")
    return LoraModule(down, up, float(down.shape[0] if alpha is None else alpha))


def peft_alpha(module: LoraModule, use_rslora: bool) -> float:
    """The ``lora_alpha`` PEFT needs to reproduce the module's scale."""
    return module.alpha / math.sqrt(module.rank) if use_rslora else module.alpha


def alpha_from_peft(lora_alpha: float, rank: int, use_rslora: bool) -> float:
    return lora_alpha * math.sqrt(rank) if use_rslora else float(lora_alpha)


@dataclass
class LoraAdapter:
    modules: dict[str, LoraModule]
    # How a PEFT config should express the alphas (the scales themselves are fixed by the modules).
    use_rslora: bool = False
    # Provenance written into file headers: base model, training steps, trigger phrase, targets.
    metadata: dict[str, str] = field(default_factory=dict)

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT keys (``base_model.model.<path>.lora_A.weight``)."""
        style = STYLES["peft"]
        state = {}
        for path, module in sorted(self.modules.items()):
            state[style.key(path, DOWN)] = module.down
            state[style.key(path, UP)] = module.up
        return state

    def ranks(self) -> dict[str, int]:
        return {path: module.rank for path, module in self.modules.items()}

    def alphas(self) -> dict[str, float]:
        """Per module, in the file convention (scale = alpha / rank)."""
        return {path: module.alpha for path, module in self.modules.items()}

    def to(self, dtype: torch.dtype) -> "LoraAdapter":
        modules = {p: LoraModule(m.down.to(dtype), m.up.to(dtype), m.alpha) for p, m in self.modules.items()}
        return LoraAdapter(modules, self.use_rslora, dict(self.metadata))

    def peft_config(self, base_model_name_or_path: str | None = None):
        """A ``peft.LoraConfig`` that rebuilds exactly these modules, ranks and scales: the most common rank
        and alpha, the others per module."""
        ranks = self.ranks()
        alphas = {path: peft_alpha(m, self.use_rslora) for path, m in self.modules.items()}
        rank, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        return peft_lora_config(
            rank, alpha, use_rslora=self.use_rslora, target_modules=module_regex(sorted(self.modules)),
            rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
            alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha},
            base_model_name_or_path=base_model_name_or_path,
        )


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """A command line's ``PATH`` or ``PATH:WEIGHT`` → (path, weight); the weight defaults to 1."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' inside the path itself
    if not spec:
        raise ConvertError("empty LoRA spec; expected PATH or PATH:WEIGHT")
    return spec, 1.0


def stack_adapters(weighted: Sequence[tuple[LoraAdapter, float]]) -> LoraAdapter:
    """One adapter equal to applying every (adapter, weight) at once, by concatenating along the rank.

    For a module in several adapters A = [A₁; A₂; …] and B = [w₁·s₁·B₁, w₂·s₂·B₂, …] with alpha = total rank
    (scale 1), so B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ, the update of PEFT's ``add_weighted_adapter(combination_type="cat")``.
    """
    if not weighted:
        raise ConvertError("nothing to stack: give at least one adapter")
    dtypes = {m.down.dtype for adapter, _ in weighted for m in adapter.modules.values()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    parts: dict[str, list[tuple[LoraModule, float]]] = defaultdict(list)
    for adapter, weight in weighted:
        for path, module in adapter.modules.items():
            parts[path].append((module, weight))
    modules = {}
    for path, found in sorted(parts.items()):
        shapes = {m.weight_shape for m, _ in found}
        if len(shapes) > 1:
            raise ConvertError(f"cannot stack: {path} has different weight shapes in the adapters: "
                               f"{sorted(list(s) for s in shapes)}")
        down = torch.cat([m.down.float() for m, _ in found]).to(dtype)
        up = torch.cat([(w * m.scale) * m.up.float() for m, w in found], dim=1).to(dtype)
        modules[path] = LoraModule(down, up, float(down.shape[0]))
    return LoraAdapter(modules, use_rslora=False)


def peft_lora_config(rank: int, alpha: float, *, use_rslora: bool, target_modules: str, dropout: float = 0.0,
                     rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None,
                     base_model_name_or_path: str | None = None):
    """The ``peft.LoraConfig`` of every LoRA this package builds: training targets and configs rebuilt from adapters."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        use_rslora=use_rslora,
        target_modules=target_modules,
        rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {},
        lora_dropout=dropout,
        base_model_name_or_path=base_model_name_or_path,
    )


def check_fits(adapter: LoraAdapter, weight_shapes: Mapping[str, Sequence[int]], where: str) -> None:
    """Every module must exist in the target model with the weight shape the adapter updates."""
    problems = []
    for path, module in sorted(adapter.modules.items()):
        shape = weight_shapes.get(f"{path}.weight")
        if shape is None:
            problems.append(f"{path} has no weight in {where}")
        elif tuple(shape) != module.weight_shape:
            problems.append(
                f"{path}: the LoRA updates a {list(module.weight_shape)} weight (lora_B {list(module.up.shape)} · "
                f"lora_A {list(module.down.shape)}) but {where} has {list(shape)}"
            )
    if problems:
        raise ConvertError(f"the adapter does not fit {where} (was it trained on another base model?): "
                           + listing(problems, 4))


def attach_adapter(model: nn.Module, adapter: LoraAdapter, adapter_name: str = "default"):
    """Wrap ``model`` (HiDreamO1 or the HF Qwen3-VL model) in a PEFT model carrying ``adapter``, unmerged."""
    from peft import get_peft_model, set_peft_model_state_dict

    check_fits(adapter, {name: p.shape for name, p in model.named_parameters()}, "the model")
    peft_model = get_peft_model(model, adapter.peft_config(), adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, adapter.peft_state_dict(), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ConvertError(f"PEFT did not take the adapter as built: missing {listing(missing)}, "
                           f"unexpected {listing(result.unexpected_keys)}")
    return peft_model
