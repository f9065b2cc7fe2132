"""LoRA on a quantized frozen base (NF4, fp8), CPU offload, and the LM head left out of training."""

import json

import pytest
import torch
from torch.distributed.tensor import DTensor

from helpers import CAPTIONS, WORKERS, make_trainer, noise_samples, run_python, set_flags
from hidream_ft.config import ConfigError
from hidream_ft.convert import FullWeights, load_source, merge_checkpoint
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.lora import read_peft_dir
from hidream_ft.model import load_model
from hidream_ft.model.quantize import DECODER_LINEARS, quantize_decoder_linears
from hidream_ft.model.safetensors_io import open_safetensors
from hidream_ft.parallel.distributed import shutdown

QUANTIZED = ["model.dtype='bfloat16'", "parallel.param_dtype='bfloat16'", "optim.lr=3e-2"]
# Relative error of a quantized decoder linear's output on random inputs: NF4 has 16 levels per 64-weight
# block, fp8 (e4m3) 3 mantissa bits under one scale per output row.
OUTPUT_ERROR = {"nf4": 0.15, "fp8": 0.06}


def fixed_batch(trainer):
    return TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))


def trained_adapter(checkpoint, output_dir, quantization, steps):
    trainer = make_trainer(checkpoint, output_dir, *QUANTIZED, f"model.base_quantization='{quantization}'")
    batch = fixed_batch(trainer)
    losses = [trainer.step([batch])["loss"] for _ in range(steps)]
    return trainer, losses, trainer.save_adapter()


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_quantized_linears_stay_close_to_the_bf16_ones(tiny_checkpoint, tokenizer, method):
    model = load_model(tiny_checkpoint, dtype=torch.bfloat16, tokenizer=tokenizer)
    layer = model.decoder_layers[0]
    weights = {name: getattr(getattr(layer, block), name).weight.detach().clone()
               for name, block in DECODER_LINEARS.items()}
    quantize_decoder_linears(model, method)
    generator = torch.Generator().manual_seed(0)
    for name, block in DECODER_LINEARS.items():
        quantized = getattr(getattr(layer, block), name)
        assert quantized.base_quantization == method and not quantized.weight.requires_grad
        inputs = torch.randn(16, quantized.in_features, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            expected, got = (inputs.float() @ weights[name].float().T), quantized(inputs).float()
        error = (got - expected).norm() / expected.norm()
        assert 0 < error < OUTPUT_ERROR[method], (name, error)
    assert model.model.x_embedder.proj1.weight.dtype == torch.bfloat16  # heads are not quantized
    assert type(model.model.visual.blocks[0].attn.qkv) is torch.nn.Linear  # nor the ViT


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_lora_on_a_quantized_base_trains_and_exports_onto_the_full_precision_base(tiny_checkpoint, tmp_path, method):
    trainer, losses, adapter_dir = trained_adapter(tiny_checkpoint, tmp_path / method, method, steps=6)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < 0.98 * losses[0], losses
    q_proj = trainer.base.model.language_model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ in ("peft.tuners.lora.bnb", "peft.tuners.lora.torchao")  # PEFT's own layer
    assert q_proj.base_layer.base_quantization == method
    assert q_proj.lora_A["default"].weight.dtype == torch.float32
    assert all(".lora_A." in n or ".lora_B." in n for n, p in trainer.model.named_parameters() if p.requires_grad)

    # Same keys and shapes as an adapter trained on the unquantized base.
    _, _, plain_dir = trained_adapter(tiny_checkpoint, tmp_path / "none", "none", steps=1)
    with open_safetensors(adapter_dir / "adapter_model.safetensors") as q, \
            open_safetensors(plain_dir / "adapter_model.safetensors") as plain:
        assert sorted(q.keys()) == sorted(plain.keys())
        assert all(q.get_slice(k).get_shape() == plain.get_slice(k).get_shape() for k in q.keys())

    adapter = read_peft_dir(adapter_dir)
    merged = merge_checkpoint(tiny_checkpoint, tmp_path / "merged", loras=[(adapter, 1.0)])
    key = "model.language_model.layers.0.self_attn.q_proj"
    lora = adapter.modules[key]
    with open_safetensors(merged / "model.safetensors") as out:
        base = load_model(tiny_checkpoint, dtype=torch.float32).state_dict()
        expected = base[f"{key}.weight"] + lora.scale * lora.up.float() @ lora.down.float()
        torch.testing.assert_close(out.get_tensor(f"{key}.weight"), expected, rtol=1e-6, atol=1e-6)
        assert lora.up.abs().sum() > 0
        torch.testing.assert_close(out.get_tensor("lm_head.weight"), base["lm_head.weight"], rtol=0, atol=0)
    load_model(merged, dtype=torch.float32)  # a complete official checkpoint


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_fsdp_leaves_the_quantized_base_whole_and_shards_the_rest(tiny_checkpoint, tmp_path, method):
    # CPU offload makes one process apply FSDP too.
    trainer = make_trainer(tiny_checkpoint, tmp_path, *QUANTIZED, f"model.base_quantization='{method}'",
                           "parallel.offload='cpu'")
    q_proj = trainer.base.model.language_model.layers[0].self_attn.q_proj
    assert not isinstance(q_proj.base_layer.weight, DTensor)  # replicated: every rank holds it whole
    assert isinstance(q_proj.lora_A["default"].weight, DTensor)
    assert isinstance(trainer.base.model.language_model.norm.weight, DTensor)
    batch = fixed_batch(trainer)
    losses = [trainer.step([batch])["loss"] for _ in range(3)]
    assert losses[-1] < losses[0], losses


def test_a_quantized_base_is_refused_where_it_cannot_work(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="needs train.mode = 'lora'"):
        make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "model.base_quantization='nf4'")
    with pytest.raises(ConfigError, match="parallel.param_dtype = 'bfloat16'"):
        make_trainer(tiny_checkpoint, tmp_path, "model.base_quantization='fp8'")  # the tiny setup computes in fp32
    with pytest.raises(ConfigError, match="cannot wrap the packed 4-bit linears"):
        make_trainer(tiny_checkpoint, tmp_path, *QUANTIZED, "model.base_quantization='nf4'", "lora.kind='lokr'")


@pytest.mark.parametrize("method, kind", [("nf4", "dora"), ("fp8", "loha")])
def test_other_adapter_kinds_train_on_a_quantized_base(tiny_checkpoint, tmp_path, method, kind):
    trainer = make_trainer(tiny_checkpoint, tmp_path, *QUANTIZED, f"model.base_quantization='{method}'",
                           f"lora.kind='{kind}'")
    batch = fixed_batch(trainer)
    losses = [trainer.step([batch])["loss"] for _ in range(3)]
    assert losses[-1] < losses[0], losses


def test_training_does_not_build_the_lm_head_unless_a_full_fine_tune_trains_it(tiny_checkpoint, tmp_path):
    lora = make_trainer(tiny_checkpoint, tmp_path / "lora")
    assert lora.base.lm_head is None
    assert not any(k.startswith("lm_head") for k in lora.base.state_dict())
    full = make_trainer(tiny_checkpoint, tmp_path / "full", "train.mode='full'")
    assert full.base.lm_head is None
    head = make_trainer(tiny_checkpoint, tmp_path / "head", "train.mode='full'", "full.train_lm_head=true")
    assert head.base.lm_head.weight.requires_grad


def test_full_fine_tune_stores_frozen_parts_in_the_compute_dtype(tiny_checkpoint, tmp_path):
    bf16 = "parallel.param_dtype='bfloat16'"
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "model.dtype='auto'", bf16)
    backbone = trainer.base.model
    assert {p.dtype for p in backbone.visual.parameters()} == {torch.bfloat16}
    assert backbone.language_model.embed_tokens.weight.dtype == torch.bfloat16
    assert {p.dtype for p in trainer.params} == {torch.float32}
    trainer.step([fixed_batch(trainer)])
    # Computing in fp32, the frozen parts stay fp32 too.
    fp32 = make_trainer(tiny_checkpoint, tmp_path / "fp32", "train.mode='full'", "model.dtype='auto'")
    assert fp32.base.model.language_model.embed_tokens.weight.dtype == torch.float32
    fp32.step([fixed_batch(fp32)])
    # An explicit model.dtype is the dtype of every weight that FSDP keeps.
    explicit = make_trainer(tiny_checkpoint, tmp_path / "explicit", "train.mode='full'", bf16)
    assert explicit.base.model.language_model.embed_tokens.weight.dtype == torch.float32


def test_cpu_offload_policy_is_applied_to_every_fsdp_unit_and_trains(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "parallel.offload='cpu'", "train.mode='full'")
    backbone = trainer.base.model
    units = [*backbone.language_model.layers, backbone.language_model.embed_tokens, trainer.base]
    for unit in units:
        policy = unit._get_fsdp_state()._fsdp_param_group.offload_policy
        assert type(policy).__name__ == "CPUOffloadPolicy"
    batch = fixed_batch(trainer)
    losses = [trainer.step([batch])["loss"] for _ in range(3)]
    assert losses[-1] < losses[0], losses


def test_full_fine_tune_export_takes_the_lm_head_from_the_base_files(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path / "run", "train.mode='full'")
    trainer.step([fixed_batch(trainer)])
    step_dir = trainer.save_checkpoint(1, None)
    source = load_source(step_dir)
    assert isinstance(source, FullWeights) and "lm_head.weight" not in source.tensors
    merged = merge_checkpoint(tiny_checkpoint, tmp_path / "hf", full=source.tensors)
    base = load_model(tiny_checkpoint, dtype=torch.float32).state_dict()
    exported = load_model(merged, dtype=torch.float32).state_dict()
    assert torch.equal(exported["lm_head.weight"], base["lm_head.weight"])
    key = "model.language_model.layers.0.mlp.up_proj.weight"
    trained = trainer.base.state_dict()[key]
    trained = trained.full_tensor() if isinstance(trained, DTensor) else trained
    assert torch.equal(exported[key], trained)
    assert not torch.equal(exported[key], base[key])


def test_a_checkpoint_that_holds_the_lm_head_still_resumes(tiny_checkpoint, tmp_path):
    # As a full fine-tune saved while training still built the LM head.
    old = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "full.train_lm_head=true")
    batch = fixed_batch(old)
    old.step([batch])
    old.save_checkpoint(1, None)
    expected = old.step([batch])["loss"]
    shutdown()
    resumed = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'")
    assert resumed.resume()[0] == 1
    assert resumed.step([batch])["loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["nf4", "fp8"])
def test_lora_on_a_quantized_base_resumes_exactly(tiny_checkpoint, tmp_path, method):
    options = [*QUANTIZED, f"model.base_quantization='{method}'"]
    first = make_trainer(tiny_checkpoint, tmp_path, *options)
    batch = fixed_batch(first)
    first.step([batch])
    first.save_checkpoint(1, None)
    expected = first.step([batch])["loss"]
    shutdown()
    resumed = make_trainer(tiny_checkpoint, tmp_path, *options)
    assert resumed.resume()[0] == 1
    assert resumed.step([batch])["loss"] == expected


@pytest.mark.distributed
def test_two_ranks_on_an_nf4_base_match_one_rank(tiny_checkpoint, tmp_path):
    flags = set_flags("model.base_quantization=nf4", "model.dtype=bfloat16", "parallel.param_dtype=bfloat16",
                      "optim.lr=1e-2")
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"{nproc}.json"
        run_python(WORKERS / "fixed_batches.py", tiny_checkpoint, tmp_path / f"r{nproc}", out, 3, *flags, nproc=nproc)
        runs[nproc] = json.loads(out.read_text())
    assert runs[2]["frozen_shards"] > 0  # the rest of the frozen base is still sharded
    # One process computes under autocast, two under FSDP's bf16 casts: equal up to bf16 rounding.
    for step, loss in runs[1]["losses"].items():
        assert runs[2]["losses"][step] == pytest.approx(loss, rel=1e-2), step
