"""HiDream-O1-Image: stock transformers Qwen3-VL modules plus the three HiDream heads, in the official
checkpoint's module tree; only the generation forward is ours (docs/sampling.md, "Model internals")."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel, Qwen3VLVisionModel

from hidream_ft.model.attention import ATTENTION_NAME, build_attention_layout
from hidream_ft.model.heads import BottleneckPatchEmbed, FinalLayer, TimestepEmbedder
from hidream_ft.model.layout import REFERENCE_TYPE, TARGET_TYPE
from hidream_ft.model.patches import PATCH_DIM


def rope_parameters(text_config) -> tuple[float, list[int]]:
    """(rope_theta, mrope_section) from either the transformers 5.x or the 4.57-style config fields."""
    params = dict(getattr(text_config, "rope_parameters", None) or {})
    params.update(getattr(text_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(text_config, "rope_theta", None))
    section = params.get("mrope_section")
    if theta is None or section is None:
        raise ValueError("text_config needs rope_theta and rope_scaling.mrope_section")
    return float(theta), list(section)


def mrope_cos_sin(
    position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved 3-D rotary tables from [3, B, S] positions, computed in fp32.

    Frequency slot j uses the H coordinate when j ≡ 1 (mod 3), W when j ≡ 2 (mod 3), both below
    3·section, and T otherwise; the slots are then duplicated for rotate-half.
    """
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, B, S, D/2]
    mixed = freqs[0].clone()
    for axis in (1, 2):
        slots = slice(axis, mrope_section[axis] * 3, 3)
        mixed[..., slots] = freqs[axis, ..., slots]
    emb = torch.cat([mixed, mixed], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class HiDreamO1Backbone(nn.Module):
    """The official ``Qwen3VLModel`` with the HiDream heads as attributes (checkpoint prefix ``model.``)."""

    def __init__(self, config: Qwen3VLConfig):
        super().__init__()
        text = config.text_config
        self.visual = Qwen3VLVisionModel(config.vision_config)
        self.language_model = Qwen3VLTextModel(text)
        self.t_embedder1 = TimestepEmbedder(text.hidden_size)
        self.x_embedder = BottleneckPatchEmbed(PATCH_DIM, text.hidden_size)
        self.final_layer2 = FinalLayer(text.hidden_size, PATCH_DIM)


class HiDreamO1(nn.Module):
    def __init__(self, config: Qwen3VLConfig, tms_token_id: int, attention: str = "auto", lm_head: bool = True):
        """``lm_head=False`` leaves out the LM head (0.6B parameters at full size), which image generation
        never uses: training does not build it; the official checkpoint and every export keep it."""
        super().__init__()
        self.config = config
        self.tms_token_id = tms_token_id
        self.attention = attention
        self.model = HiDreamO1Backbone(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False) if lm_head else None
        text._attn_implementation = ATTENTION_NAME
        theta, self.mrope_section = rope_parameters(text)
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # A plain attribute, not a buffer: it must stay fp32 whatever dtype the module is cast to, as in the
        # official inference; bf16 frequencies lose precision at positions above the 4096 image anchor. Computed
        # in fp32 step by step like the official rotary init, so the frequencies are bitwise its own.
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        self.inv_freq = 1.0 / theta**exponents

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """ViT condition features: (merged embeddings [n, H], DeepStack features, one [n, H] per early layer)."""
        visual = self.model.visual
        out = visual(pixel_values.to(visual.patch_embed.proj.weight.dtype), grid_thw=image_grid_thw)
        if isinstance(out, tuple):  # transformers releases that return (embeds, deepstack)
            return out[0], list(out[1])
        return out.pooler_output, list(out.deepstack_features)

    def vision_must_run(self) -> bool:
        """Whether a batch without images still has to run the ViT ("fake vision forward").

        Under FSDP every rank must join the ViT's parameter all-gathers (whenever the ViT is sharded) and its
        gradient reduce-scatters (whenever it trains) in every step, also when its own batch is text-to-image
        while another rank's is an edit; otherwise the collectives pair up wrongly and the job hangs. A
        trainable ViT also gets zero (not missing) gradients this way, as the optimizer and clipping expect.
        A frozen ViT is never sharded (``parallelize``), so it runs only for batches with images.
        """
        first = next(self.model.visual.parameters())
        if isinstance(first, DTensor) and first.device_mesh.size() > 1:
            return True
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.model.visual.parameters())

    def fake_vision_term(self) -> torch.Tensor:
        """A zero scalar that depends on every ViT parameter: the ViT (mergers and DeepStack mergers included)
        run on an all-zero 2×2×2-patch input, summed and multiplied by 0."""
        vision = self.config.vision_config
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixel_values = torch.zeros(8, patch_dim, device=next(self.model.visual.parameters()).device)
        grid = torch.tensor([[2, 2, 2]], device=pixel_values.device)
        embeds, deepstack = self.encode_images(pixel_values, grid)
        return sum((f.sum() for f in deepstack), embeds.sum()) * 0.0

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        vinputs: torch.Tensor,
        timestep: torch.Tensor,
        token_types: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        output_tokens: int | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the clean patches of the image tokens.

        input_ids [B, T] (text part, left-padded, ending in `<|tms_token|>`); position_ids [3, B, T+N];
        vinputs [B, N, 3072] (noisy target then clean references); timestep [B] (= 1 - σ);
        token_types [B, T+N] (0 text, >0 tms/image); attention_mask [B, T+N] (1 = real token, 0 = padding)
        or None; pixel_values/image_grid_thw: ViT condition images for edit/IP layouts.
        Returns x_pred [B, output_tokens or N, 3072] for the first image tokens.

        Packed rows (``document_ids`` given, see ``model.layout.PackedLayout``): input_ids, position_ids,
        token_types, attention_mask and document_ids span whole rows [R, S]; vinputs [P, 3072] fills the image
        slots in row order; timestep holds one value per sample. Returns the target tokens [P_target, 3072].
        """
        embeds, visual_mask, deepstack = self._token_embeddings(input_ids, timestep, pixel_values, image_grid_thw)
        patches = self.model.x_embedder(vinputs.to(self.model.x_embedder.proj1.weight.dtype)).to(embeds.dtype)
        if document_ids is None:
            num_text = input_ids.shape[1]
            hidden = torch.cat([embeds, patches], dim=1)
        else:
            num_text = None
            image_slots = (token_types == TARGET_TYPE) | (token_types == REFERENCE_TYPE)
            hidden = embeds.masked_scatter(image_slots[..., None], patches)

        self.inv_freq = self.inv_freq.to(hidden.device)
        rotary = mrope_cos_sin(position_ids, self.inv_freq, self.mrope_section, hidden.dtype)
        layout = build_attention_layout(self.attention, token_types=token_types, attention_mask=attention_mask,
                                        document_ids=document_ids, num_text_tokens=num_text)
        for index, layer in enumerate(self.decoder_layers):
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=layout)
            if index < len(deepstack):
                hidden = _add_deepstack(hidden, visual_mask, deepstack[index])

        # The head acts per token, so only the target rows are normalised and projected.
        if document_ids is None:
            end = num_text + (output_tokens if output_tokens is not None else vinputs.shape[1])
            targets = hidden[:, num_text:end]
        else:
            targets = hidden[token_types == TARGET_TYPE]
        return self.model.final_layer2(self.model.language_model.norm(targets))

    def _token_embeddings(self, input_ids, timestep, pixel_values, image_grid_thw):
        """Embeddings of the text tokens with the ViT features at the `<|image_pad|>` placeholders and each
        sample's timestep embedding at its `<|tms_token|>` (one per sample, in row order); also the placeholder
        mask and the DeepStack features for the decoder loop."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        deepstack, visual_mask = [], None
        if pixel_values is not None:
            image_embeds, deepstack = self.encode_images(pixel_values, image_grid_thw)
            visual_mask = (input_ids == self.config.image_token_id)[..., None]
            placeholders = int(visual_mask.sum())
            if placeholders != image_embeds.shape[0]:
                raise ValueError(f"the prompts hold {placeholders} <|image_pad|> tokens but the ViT returned "
                                 f"{image_embeds.shape[0]} features; pixel_values and the layout disagree")
            embeds = embeds.masked_scatter(visual_mask, image_embeds.to(embeds.dtype))
        elif self.vision_must_run():
            embeds = embeds + self.fake_vision_term().to(embeds.dtype)
        t_emb = self.model.t_embedder1(timestep).to(embeds.dtype)
        embeds = embeds.masked_scatter((input_ids == self.tms_token_id)[..., None], t_emb)
        return embeds, visual_mask, deepstack


def _add_deepstack(hidden: torch.Tensor, visual_mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """Add DeepStack features at the ViT placeholder positions (out of place); ``visual_mask`` covers the text
    part of ordinary batches, whole rows of packed ones."""
    num_text = visual_mask.shape[1]
    text = hidden[:, :num_text]
    addend = torch.zeros_like(text).masked_scatter(visual_mask, features.to(text.dtype))
    return torch.cat([text + addend, hidden[:, num_text:]], dim=1)
