"""The EMA of the trainable parameters: the update math, the trainer's use of it (skipped steps, validation,
adapter-ema/), checkpoints (exact resume, resharding, older checkpoints) and ``convert --ema``."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from helpers import CAPTIONS, WORKERS, make_trainer, noise_samples, run_python, set_flags
from hidream_ft.config import ConfigError, load_config
import hidream_ft.trainer as trainer_module
from hidream_ft.convert.__main__ import main as convert
from hidream_ft.data.collate import TextToImageCollator
from hidream_ft.demo import write_demo
from hidream_ft.errors import UserError
from hidream_ft.model import load_model
from hidream_ft.optim.ema import ParamEma, ema_decay, lerp_weight, state_dict_key
from hidream_ft.runtime.checkpoint import EMA_WEIGHTS, load_model_state
from hidream_ft.train import main as train_main


def fixed_batch(trainer):
    return TextToImageCollator(trainer.tokenizer, trainer.tokens, 128)(noise_samples(CAPTIONS[:2]))


def trainable(trainer) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in trainer.ema.params.items()}


# --- the math ----------------------------------------------------------------------------------------------


def test_warmup_decay_is_min_of_decay_and_the_update_ratio():
    updates = torch.tensor([0, 1, 10, 100, 10_000])
    expected = torch.tensor([min(0.999, (1 + n) / (10 + n)) for n in updates.tolist()])
    torch.testing.assert_close(ema_decay(0.999, updates, warmup=True), expected, rtol=0, atol=1e-7)
    assert ema_decay(0.999, updates, warmup=True)[0] == pytest.approx(0.1)
    torch.testing.assert_close(ema_decay(0.999, updates, warmup=False), torch.full((5,), 0.999))


def test_a_skipped_step_does_not_move_the_average():
    decay = torch.tensor(0.9)
    assert lerp_weight(decay, torch.tensor(True)) == 0
    assert lerp_weight(decay, torch.tensor(False)) == pytest.approx(0.1)


def test_updates_follow_the_formula_in_fp32_and_skips_count_nothing():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.bfloat16))
    ema = ParamEma({"w": param}, decay=0.5, warmup=False)
    assert ema.averages["w"].dtype == torch.float32
    with torch.no_grad():
        param.fill_(3.0)
    ema.update(torch.tensor(False))
    torch.testing.assert_close(ema.averages["w"], torch.tensor([2.0, 0.5]), rtol=0, atol=0)
    with torch.no_grad():
        param.fill_(100.0)
    ema.update(torch.tensor(True))
    torch.testing.assert_close(ema.averages["w"], torch.tensor([2.0, 0.5]), rtol=0, atol=0)
    assert ema.updates.item() == 1


def test_swapped_in_weights_are_the_average_and_then_exactly_the_weights_again():
    param = torch.nn.Parameter(torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16))
    ema = ParamEma({"w": param}, decay=0.9, warmup=False)
    with torch.no_grad():
        param.add_(1.0)
    kept = param.detach().clone()
    ema.update(torch.tensor(False))
    with ema.swapped_in():
        assert torch.equal(param.detach(), ema.averages["w"].to(torch.bfloat16))
    assert torch.equal(param.detach(), kept)


def test_names_are_state_dict_keys():
    wrapped = "model.layers.0._checkpoint_wrapped_module.mlp._orig_mod.weight"
    assert state_dict_key(wrapped) == "model.layers.0.mlp.weight"


@pytest.mark.parametrize("override, message", [("ema.decay=1.0", r"ema\.decay: must be in \[0, 1\)"),
                                               ("ema.every=0", r"ema\.every: must be ≥ 1")])
def test_bad_values_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


# --- the trainer -------------------------------------------------------------------------------------------


def test_trainer_average_is_the_hand_computed_one_and_skips_what_the_optimizer_skips(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "ema.enabled=true", "ema.decay=0.8",
                           "ema.every=2", "parallel.activation_checkpointing='full'")
    assert any("_checkpoint_wrapped_module" in name for name, _ in trainer.model.named_parameters())
    assert trainer.ema.averages.keys() == {name for name, p in trainer.model.state_dict(keep_vars=True).items()
                                           if p.requires_grad}
    good, bad = fixed_batch(trainer), fixed_batch(trainer)
    bad.x0[0, 0, 0] = float("nan")
    expected = {name: value.float() for name, value in trainable(trainer).items()}
    updates = 0
    for step, batch in enumerate([good, good, good, bad, good, good, good], start=1):
        trainer.step([batch], read=False)
        if step % 2 == 0 and batch is good:
            weight = 1 - min(0.8, (1 + updates) / (10 + updates))
            expected = {name: torch.lerp(expected[name], value.float(), weight)
                        for name, value in trainable(trainer).items()}
            updates += 1
    trainer.flush()
    assert trainer.skipped_total == 1 and trainer.ema.updates.item() == updates == 2
    params = trainable(trainer)
    assert any(not torch.equal(trainer.ema.averages[name], params[name]) for name in params)
    for name, average in trainer.ema.averages.items():
        torch.testing.assert_close(average, expected[name], rtol=1e-6, atol=1e-7, msg=name)


def test_an_off_ema_leaves_nothing_behind(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path)
    trainer.step([fixed_batch(trainer)], read=False)
    trainer.save_checkpoint(1, {"position": 1})
    assert trainer.ema is None
    assert trainer.save_adapter().name == "adapter" and not (tmp_path / "adapter-ema").exists()
    with pytest.raises(UserError, match="holds no EMA weights"):
        load_model_state(tmp_path / "checkpoints" / "step-00000001", EMA_WEIGHTS)


def test_validation_weights_are_the_average(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "ema.enabled=true", "ema.warmup=false", "ema.decay=0.5")
    trainer.step([fixed_batch(trainer)], read=False)
    params = trainable(trainer)
    with trainer.validation_weights():
        for name, param in trainer.ema.params.items():
            assert torch.equal(param.detach(), trainer.ema.averages[name].to(param.dtype)), name
    assert all(torch.equal(param.detach(), params[name]) for name, param in trainer.ema.params.items())
    trainer.cfg.ema.for_validation = False
    with trainer.validation_weights():
        assert all(torch.equal(param.detach(), params[name]) for name, param in trainer.ema.params.items())


def test_a_checkpoint_without_ema_starts_the_average_from_its_weights(tiny_checkpoint, tmp_path, capsys):
    first = make_trainer(tiny_checkpoint, tmp_path)
    first.step([fixed_batch(first)], read=False)
    first.save_checkpoint(1, {"position": 1})
    resumed = make_trainer(tiny_checkpoint, tmp_path, "ema.enabled=true")
    assert resumed.resume()[0] == 1
    assert "holds no EMA; the average starts from its weights" in capsys.readouterr().err
    for name, param in resumed.ema.params.items():
        assert torch.equal(resumed.ema.averages[name], param.detach().float()), name
    assert resumed.ema.updates.item() == 0


def test_adapter_ema_loads_with_peft_and_convert_ema_reads_the_same_average(tiny_checkpoint, tmp_path, tokenizer,
                                                                             capsys):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "ema.enabled=true", "ema.decay=0.5")
    for _ in range(3):
        trainer.step([fixed_batch(trainer)], read=False)
    trainer.save_checkpoint(3, {"position": 3})
    trainer.save_adapter()
    adapter_ema = tmp_path / "adapter-ema"
    loaded = PeftModel.from_pretrained(load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer),
                                       str(adapter_ema))
    loaded_state = loaded.state_dict()
    for name, average in trainer.ema.averages.items():
        assert torch.equal(loaded_state[name], average), name
    plain = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    written = load_file(str(adapter_ema / "adapter_model.safetensors"))
    assert plain.keys() == written.keys() and any(not torch.equal(plain[k], written[k]) for k in plain)

    step_dir = tmp_path / "checkpoints" / "step-00000003"
    assert convert(["export", str(step_dir), "--ema", "--to", "peft", "--out", str(tmp_path / "from-step")]) == 0
    assert convert(["export", str(tmp_path), "--ema", "--to", "peft", "--out", str(tmp_path / "from-run")]) == 0
    for out in ("from-step", "from-run"):
        exported = load_file(str(tmp_path / out / "adapter_model.safetensors"))
        assert exported.keys() == written.keys()
        assert all(torch.equal(exported[k], written[k]) for k in written), out
    capsys.readouterr()
    assert convert(["export", str(adapter_ema), "--ema", "--to", "peft", "--out", str(tmp_path / "refused")]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err


def test_merge_ema_of_a_full_fine_tune_holds_the_average(tiny_checkpoint, tmp_path):
    trainer = make_trainer(tiny_checkpoint, tmp_path, "train.mode='full'", "ema.enabled=true", "ema.decay=0.5")
    for _ in range(2):
        trainer.step([fixed_batch(trainer)], read=False)
    trainer.save_checkpoint(2, {"position": 2})
    step_dir = tmp_path / "checkpoints" / "step-00000002"
    assert convert(["merge", str(step_dir), "--ema", "--out", str(tmp_path / "merged"),
                    "--base", str(tiny_checkpoint)]) == 0
    merged = load_model(tmp_path / "merged", dtype=torch.float32).state_dict()
    for name, average in trainer.ema.averages.items():
        assert torch.equal(merged[name], average), name
    assert any(not torch.equal(merged[name], param.detach()) for name, param in trainer.ema.params.items())


def test_a_run_validates_with_the_average_and_writes_it_as_adapter_ema(tmp_path, monkeypatch):
    rendered = []
    render = trainer_module.render_validation

    def recording_render(model, *args):
        rendered.append({state_dict_key(name).replace(".default", ""): param.detach().clone()
                         for name, param in model.named_parameters() if param.requires_grad})
        return render(model, *args)

    monkeypatch.setattr(trainer_module, "render_validation", recording_render)
    config = write_demo(tmp_path / "demo", steps=2)
    assert train_main(["--config", str(config), *set_flags(
        "ema.enabled=true", "ema.decay=0.5", "data.num_workers=0", "validation.every=2",
        "validation.prompts=['a fox']", "validation.steps=1", "validation.width=64", "validation.height=32")]) == 0
    output_dir = tmp_path / "demo" / "output"
    average = load_file(str(output_dir / "adapter-ema" / "adapter_model.safetensors"))
    final = load_file(str(output_dir / "adapter" / "adapter_model.safetensors"))
    assert len(rendered) == 1 and rendered[0].keys() == average.keys()
    assert all(torch.equal(rendered[0][key], average[key]) for key in average)
    assert any(not torch.equal(final[key], average[key]) for key in average)


# --- several processes -------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_ema_resumes_bitwise_and_reshards_from_two_ranks_to_one(tiny_checkpoint, tmp_path):
    def run(name, nproc, steps, run_dir, *flags):
        out = tmp_path / f"{name}.json"
        run_python(WORKERS / "fixed_batches.py", tiny_checkpoint, run_dir, out, steps, *flags,
                   *set_flags("lora.train_heads=['final_layer2']", "ema.enabled=true", "ema.decay=0.7"),
                   nproc=nproc)
        return json.loads(out.read_text())

    straight = run("straight", 2, 4, tmp_path / "straight")
    saved = run("saved", 2, 4, tmp_path / "run", "--save-at", 2)
    resumed = run("resumed", 2, 4, tmp_path / "run", "--resume")
    assert resumed["losses"] == {k: v for k, v in straight["losses"].items() if int(k) > 2}
    assert resumed["ema_digest"] == straight["ema_digest"] != saved["ema_digest"]
    one_rank = run("one-rank", 1, 2, tmp_path / "run", "--resume")  # loads step 2 and trains no further
    assert one_rank["world_size"] == 1
    assert one_rank["ema_digest"] == saved["ema_digest"]
