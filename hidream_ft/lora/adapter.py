"""The canonical adapter: per linear layer (by its official HF module path) the tensors of one adapter kind.

Every kind changes the weight W of module ``p`` by a ΔW computed in fp32 (:meth:`delta`):

    lora   ΔW = scale · B · A,                   A = ``down`` [rank, in], B = ``up`` [out, rank]
    dora   ΔW = m / ‖W + scale·B·A‖ · (W + scale·B·A) − W     (row norms; m = ``magnitude`` [out])
    loha   ΔW = scale · (W1a · W1b) ⊙ (W2a · W2b)
    lokr   ΔW = scale · W1 ⊗ W2                  (Kronecker; either factor may be a low-rank product)

with scale = alpha / rank, the kohya / ComfyUI convention. PEFT's rsLoRA scale alpha_peft / √rank is stored
as alpha = alpha_peft · √rank, so every writer and the merge need only this one scale.
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
from hidream_ft.lora.keys import KINDS, STYLES, module_regex


class _Scaled:
    """The one scale rule of every kind: the update is multiplied by alpha / rank (an rsLoRA alpha is stored
    already converted to this rule, :func:`alpha_from_peft`)."""

    alpha: float
    rank: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass
class LoraModule(_Scaled):
    """A LoRA, or with ``magnitude`` a DoRA."""

    down: torch.Tensor  # A (PEFT lora_A, kohya lora_down): [rank, in_features]
    up: torch.Tensor  # B (PEFT lora_B, kohya lora_up): [out_features, rank]
    alpha: float
    magnitude: torch.Tensor | None = None  # DoRA: the norm each output row of W + scale·B·A gets, [out]

    @property
    def kind(self) -> str:
        return "lora" if self.magnitude is None else "dora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Under PEFT's parameter names."""
        parts = {"lora_A": self.down, "lora_B": self.up}
        if self.magnitude is not None:
            parts["lora_magnitude_vector"] = self.magnitude
        return parts

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        update = self.scale * (self.up.float() @ self.down.float())
        if self.magnitude is None:
            return update
        adapted = weight.float() + update
        return (self.magnitude.float() / torch.linalg.vector_norm(adapted, dim=1))[:, None] * adapted - weight.float()

    def to(self, target: torch.dtype | torch.device) -> "LoraModule":
        magnitude = None if self.magnitude is None else self.magnitude.to(target)
        return LoraModule(self.down.to(target), self.up.to(target), self.alpha, magnitude)


@dataclass
class LohaModule(_Scaled):
    """LoHa: the Hadamard product of two low-rank products, PEFT's / LyCORIS' ``hada_*`` tensors."""

    w1_a: torch.Tensor  # [out, rank]
    w1_b: torch.Tensor  # [rank, in]
    w2_a: torch.Tensor  # [out, rank]
    w2_b: torch.Tensor  # [rank, in]
    alpha: float
    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def weight_shape(self) -> tuple[int, int]:
        return self.w1_a.shape[0], self.w1_b.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"hada_w1_a": self.w1_a, "hada_w1_b": self.w1_b, "hada_w2_a": self.w2_a, "hada_w2_b": self.w2_b}

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (self.w1_a.float() @ self.w1_b.float()) * (self.w2_a.float() @ self.w2_b.float())

    def to(self, target: torch.dtype | torch.device) -> "LohaModule":
        return LohaModule(*(t.to(target) for t in self.tensors().values()), self.alpha)


LOKR_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


@dataclass
class LokrModule(_Scaled):
    """LoKr: the Kronecker product W1 ⊗ W2, each factor whole (``lokr_wN``) or a low-rank product
    (``lokr_wN_a`` · ``lokr_wN_b``), PEFT's / LyCORIS' tensors."""

    factors: dict[str, torch.Tensor]  # by LOKR_PARTS name
    # PEFT's r: with alpha it sets the scale, and it decides which factors PEFT decomposes, so it is kept even
    # when both factors are whole and no shape shows it.
    rank: int
    alpha: float
    kind = "lokr"

    def factor(self, n: int) -> torch.Tensor:
        whole = self.factors.get(f"lokr_w{n}")
        if whole is not None:
            return whole.float()
        return self.factors[f"lokr_w{n}_a"].float() @ self.factors[f"lokr_w{n}_b"].float()

    def factor_shape(self, n: int) -> tuple[int, int]:
        whole = self.factors.get(f"lokr_w{n}")
        if whole is not None:
            return tuple(whole.shape)
        return self.factors[f"lokr_w{n}_a"].shape[0], self.factors[f"lokr_w{n}_b"].shape[1]

    @property
    def weight_shape(self) -> tuple[int, int]:
        (a, c), (b, d) = self.factor_shape(1), self.factor_shape(2)
        return a * b, c * d

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.factors)

    def delta(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * torch.kron(self.factor(1), self.factor(2))

    def to(self, target: torch.dtype | torch.device) -> "LokrModule":
        return LokrModule({name: t.to(target) for name, t in self.factors.items()}, self.rank, self.alpha)


AdapterModule = LoraModule | LohaModule | LokrModule


def kind_module(kind: str, path: str, parts: dict[str, torch.Tensor], rank: int | None, alpha: float,
                where: str) -> AdapterModule:
    """A checked module of ``kind`` from its tensors under PEFT's names; ``rank`` is needed by LoKr only."""
    expected = {"dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
                "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}.get(kind)
    if kind == "lokr":
        complete = all(f"lokr_w{n}" in parts or {f"lokr_w{n}_a", f"lokr_w{n}_b"} <= parts.keys() for n in (1, 2))
        if not complete or not parts.keys() <= set(LOKR_PARTS):
            raise ConvertError(f"{where}: {path}: LoKr tensors {sorted(parts)} are not two Kronecker factors "
                               "of a linear layer (lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b)")
        return LokrModule(dict(parts), rank, float(alpha))
    if expected is None or set(parts) != set(expected):
        raise ConvertError(f"{where}: {path}: {kind} adapter tensors {sorted(parts)}, expected {list(expected or ())}")
    if kind == "dora":
        module = lora_module(path, parts["lora_A"], parts["lora_B"], alpha, where)
        module.magnitude = parts["lora_magnitude_vector"].reshape(-1)
        return module
    return LohaModule(*(parts[name] for name in expected), float(alpha))


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
    modules: dict[str, AdapterModule]
    # How a PEFT config should express the alphas (the scales themselves are fixed by the modules).
    use_rslora: bool = False
    # Provenance written into file headers: base model, training steps, trigger phrase, targets.
    metadata: dict[str, str] = field(default_factory=dict)
    lokr_factor: int = -1  # PEFT's decompose_factor, which fixes the LoKr factor shapes a config rebuilds

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`; adapters are read and trained one kind at a time."""
        kinds = {module.kind for module in self.modules.values()}
        if len(kinds) > 1:
            raise ConvertError(f"an adapter mixes kinds {sorted(kinds)}; keep one kind per adapter")
        return kinds.pop() if kinds else "lora"

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter under PEFT keys (``base_model.model.<path>.lora_A.weight``, ``….hada_w1_a``)."""
        prefix = STYLES["peft"].prefix
        state = {}
        for path, module in sorted(self.modules.items()):
            for name, tensor in module.tensors().items():
                state[f"{prefix}{path}.{name}" + (".weight" if name in ("lora_A", "lora_B") else "")] = tensor
        return state

    def ranks(self) -> dict[str, int]:
        return {path: module.rank for path, module in self.modules.items()}

    def alphas(self) -> dict[str, float]:
        """Per module, in the file convention (scale = alpha / rank)."""
        return {path: module.alpha for path, module in self.modules.items()}

    def to(self, dtype: torch.dtype) -> "LoraAdapter":
        modules = {p: m.to(dtype) for p, m in self.modules.items()}
        return LoraAdapter(modules, self.use_rslora, dict(self.metadata), self.lokr_factor)

    def peft_config(self, base_model_name_or_path: str | None = None):
        """A PEFT config that rebuilds exactly these modules, ranks and scales: the most common rank and
        alpha, the others per module."""
        kind = self.kind
        ranks = self.ranks()
        alphas = {path: peft_alpha(m, self.use_rslora) if kind in ("lora", "dora") else m.alpha
                  for path, m in self.modules.items()}
        rank, alpha = Counter(ranks.values()).most_common(1)[0][0], Counter(alphas.values()).most_common(1)[0][0]
        return peft_lora_config(
            rank, alpha, kind=kind, use_rslora=self.use_rslora, target_modules=module_regex(sorted(self.modules)),
            rank_pattern={re.escape(p): r for p, r in ranks.items() if r != rank},
            alpha_pattern={re.escape(p): a for p, a in alphas.items() if a != alpha},
            base_model_name_or_path=base_model_name_or_path, lokr_factor=self.lokr_factor,
            lokr_decompose_both=any("lokr_w1_a" in m.tensors() for m in self.modules.values()),
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
    for adapter, _ in weighted:
        if adapter.kind != "lora":
            raise ConvertError(f"cannot stack a {adapter.kind} adapter into one file: only plain LoRAs concatenate "
                               "along the rank; apply adapters of other kinds together with `merge` or at sampling")
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


def peft_lora_config(rank: int, alpha: float, *, kind: str = "lora", use_rslora: bool, target_modules: str,
                     dropout: float = 0.0, rank_pattern: dict[str, int] | None = None,
                     alpha_pattern: dict[str, float] | None = None, base_model_name_or_path: str | None = None,
                     lokr_factor: int = -1, lokr_decompose_both: bool = False):
    """The PEFT config of every adapter this package builds (training targets and configs rebuilt from
    adapters): ``LoraConfig`` for lora and dora (``use_dora``), ``LoHaConfig``, ``LoKrConfig``. LoHa and LoKr
    have no rsLoRA and no input dropout (the config refuses those combinations)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    common = dict(r=rank, target_modules=target_modules, rank_pattern=rank_pattern or {},
                  alpha_pattern=alpha_pattern or {}, base_model_name_or_path=base_model_name_or_path)
    if kind == "loha":
        return LoHaConfig(alpha=alpha, **common)
    if kind == "lokr":
        return LoKrConfig(alpha=alpha, decompose_factor=lokr_factor, decompose_both=lokr_decompose_both, **common)
    if kind not in ("lora", "dora"):
        raise ConvertError(f"unknown adapter kind {kind!r}; choose from {', '.join(KINDS)}")
    return LoraConfig(lora_alpha=alpha, use_rslora=use_rslora, lora_dropout=dropout, use_dora=kind == "dora",
                      **common)


def check_fits(adapter: LoraAdapter, weight_shapes: Mapping[str, Sequence[int]], where: str) -> None:
    """Every module must exist in the target model with the weight shape the adapter updates."""
    problems = []
    for path, module in sorted(adapter.modules.items()):
        shape = weight_shapes.get(f"{path}.weight")
        if shape is None:
            problems.append(f"{path} has no weight in {where}")
        elif tuple(shape) != module.weight_shape:
            if isinstance(module, LoraModule):
                factors = f"lora_B {list(module.up.shape)} · lora_A {list(module.down.shape)}"
            else:
                factors = ", ".join(f"{name} {list(t.shape)}" for name, t in module.tensors().items())
            problems.append(f"{path}: the LoRA updates a {list(module.weight_shape)} weight ({factors}) but {where} "
                            f"has {list(shape)}")
    if problems:
        raise ConvertError(f"the adapter does not fit {where} (was it trained on another base model?): "
                           + listing(problems, 4))


def attach_adapter(model: nn.Module, adapter: LoraAdapter, adapter_name: str = "default"):
    """Wrap ``model`` (HiDreamO1 or the HF Qwen3-VL model) in a PEFT model carrying ``adapter``, unmerged."""
    from peft import get_peft_model, set_peft_model_state_dict

    check_fits(adapter, {name: p.shape for name, p in model.named_parameters()}, "the model")
    peft_model = get_peft_model(model, adapter.peft_config(), adapter_name=adapter_name)
    result = set_peft_model_state_dict(peft_model, adapter.peft_state_dict(), adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if any(f".{prefix}" in k for prefix in ("lora_", "hada_", "lokr_"))]
    if missing or result.unexpected_keys:
        raise ConvertError(f"PEFT did not take the adapter as built: missing {listing(missing)}, "
                           f"unexpected {listing(result.unexpected_keys)}")
    return peft_model
