import os
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model

from helpers import DIST_VARIABLES, forward_inputs, write_lpips_weights, write_tiny_dino
from hidream_ft.model import SpecialTokens, load_hf_config, load_model, load_tokenizer
from hidream_ft.parallel.distributed import shutdown
from hidream_ft.testing.tiny import write_tiny_checkpoint

warnings.filterwarnings("ignore", category=DeprecationWarning)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def no_process_group_outlives_its_test():
    """An in-process trainer (helpers.make_trainer) starts a one-rank process group and sets its variables;
    end both after the test, so that every test starts without a group whatever the order."""
    saved = {name: os.environ.get(name) for name in DIST_VARIABLES}
    yield
    shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-hidream"))


@pytest.fixture(scope="session")
def base(tiny_checkpoint):
    """The tiny checkpoint as the base model that adapters are trained on, merged into and exported against."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def inputs(tiny_checkpoint):
    """Forward inputs for the tiny checkpoint (helpers.forward_inputs)."""
    return forward_inputs(tiny_checkpoint)


@pytest.fixture(scope="session")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="session")
def tokens(tiny_checkpoint, tokenizer):
    return SpecialTokens.from_tokenizer(tokenizer, load_hf_config(tiny_checkpoint))


@pytest.fixture()
def tiny_model(tiny_checkpoint, tokenizer):
    torch.manual_seed(0)
    return load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer).eval()


@pytest.fixture(scope="session")
def dino_path(tmp_path_factory):
    """A tiny random DINOv2 folder for the perceptual loss and DINO scores."""
    return write_tiny_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="session")
def lpips_path(tmp_path_factory):
    """Tiny-model-independent random LPIPS (AlexNet) weights in the lpips package's layout."""
    return write_lpips_weights(tmp_path_factory.mktemp("lpips") / "alex.pth")


@pytest.fixture(scope="session")
def adapter_dir(tiny_checkpoint, tokenizer, tmp_path_factory):
    """A run folder whose ``adapter/`` is a PEFT LoRA of the tiny model with random B, so that it changes images."""
    base = load_model(tiny_checkpoint, dtype=torch.float32, tokenizer=tokenizer)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=r".*mlp\.(up_proj|down_proj)"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    run = tmp_path_factory.mktemp("run-style")
    peft_model.save_pretrained(run / "adapter")
    return run
