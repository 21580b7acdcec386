"""PEFT adapter folders: kbit -> PEFT and PEFT -> kbit give the same logits; the files are PEFT's format.

Tolerance: fp32 adapters on an fp32 model; both libraries compute the same products (measured difference: 0),
so 1e-5 on logits of magnitude ~2 only leaves room for a different summation order.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from kbit_testing import tiny_llama  # noqa: E402
from safetensors import safe_open  # noqa: E402

from kbit.export import load_adapter, save_adapter  # noqa: E402
from kbit.lora import add_lora, lora_layers  # noqa: E402

ATOL = 1e-5
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]

CONFIGS = {
    "defaults": dict(),
    "rslora": dict(r=8, alpha=16, use_rslora=True),
    "dora": dict(r=8, alpha=16, use_dora=True),
    "list": dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "modules_to_save": dict(r=8, alpha=16, modules_to_save=["lm_head"]),
}


def perturb(tensors: list[torch.Tensor], seed: int = 1) -> None:
    """Move trainable tensors off their initial values so a lost or misplaced tensor shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            t.add_(0.1 * torch.randn(t.shape, generator=gen).to(t.dtype))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def peft_config(kwargs: dict) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=kwargs.get("r", 16),
        lora_alpha=kwargs.get("alpha", 32),
        target_modules=kwargs.get("target_modules", "all-linear"),
        use_rslora=kwargs.get("use_rslora", False),
        use_dora=kwargs.get("use_dora", False),
        modules_to_save=kwargs.get("modules_to_save"),
        task_type="CAUSAL_LM",
    )


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_kbit_adapter_loads_in_peft(kwargs: dict, tmp_path: Path, ids: torch.Tensor) -> None:
    base = tiny_llama()
    mine = add_lora(copy.deepcopy(base), dtype=torch.float32, **kwargs)
    perturb([p for p in mine.parameters() if p.requires_grad])
    save_adapter(mine, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    reference = logits(base, ids)
    ours = logits(mine, ids)
    assert (ours - reference).abs().max() > 0.01  # the adapter does change the output
    torch.testing.assert_close(logits(theirs, ids), ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_peft_adapter_loads_in_kbit(kwargs: dict, tmp_path: Path, ids: torch.Tensor) -> None:
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(kwargs))
    perturb([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path / "peft")
    mine = load_adapter(tiny_llama(), tmp_path / "peft", dtype=torch.float32)
    assert (logits(theirs, ids) - logits(base, ids)).abs().max() > 0.01
    torch.testing.assert_close(logits(mine, ids), logits(theirs, ids), atol=ATOL, rtol=0)


def test_files_are_peft_format(tmp_path: Path) -> None:
    model = add_lora(tiny_llama(), r=8, alpha=16, use_dora=True, modules_to_save=["lm_head"])
    save_adapter(model, tmp_path / "a", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert sorted(os.listdir(tmp_path / "a")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]  # no temp files

    text = (tmp_path / "a" / "adapter_config.json").read_text()
    config = json.loads(text)
    assert text == json.dumps(config, indent=2, sort_keys=True) + "\n"
    assert config == {
        "alpha_pattern": {},
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "modules_to_save": ["lm_head"],
        "peft_type": "LORA",
        "r": 8,
        "rank_pattern": {},
        "target_modules": PROJECTIONS,
        "task_type": "CAUSAL_LM",
        "use_dora": True,
        "use_rslora": False,
    }

    with safe_open(str(tmp_path / "a" / "adapter_model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        dtypes = {f.get_tensor(key).dtype for key in f.keys()}
    prefix = "base_model.model.model.layers.0."
    assert shapes[prefix + "self_attn.k_proj.lora_A.weight"] == (8, 64)
    assert shapes[prefix + "self_attn.k_proj.lora_B.weight"] == (32, 8)
    assert shapes[prefix + "self_attn.k_proj.lora_magnitude_vector"] == (32,)
    assert shapes["base_model.model.lm_head.weight"] == (256, 64)
    assert len(shapes) == 2 * 7 * 3 + 1
    assert dtypes == {
        torch.bfloat16,
        torch.float32,
    }  # bf16 adapter (default dtype), fp32 copy of the fp32 head


def test_bf16_roundtrip_is_exact(tmp_path: Path) -> None:
    mine = add_lora(tiny_llama(), r=8, alpha=16, use_dora=True)
    perturb([p for p in mine.parameters() if p.requires_grad])
    save_adapter(mine, tmp_path / "a")
    again = load_adapter(tiny_llama(), tmp_path / "a")
    for (path, layer), (_, other) in zip(lora_layers(mine), lora_layers(again), strict=True):
        assert torch.equal(layer.lora_A.weight, other.lora_A.weight), path
        assert torch.equal(layer.lora_B.weight, other.lora_B.weight), path
        assert torch.equal(layer.lora_magnitude_vector, other.lora_magnitude_vector), path
    # "all-linear" comes back as the names it selected, which is what PEFT writes too.
    assert again.lora_settings == dataclasses.replace(mine.lora_settings, target_modules=tuple(PROJECTIONS))


def test_keys_with_peft_adapter_name_are_read(tmp_path: Path, ids: torch.Tensor) -> None:
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(CONFIGS["dora"]))
    perturb([p for p in theirs.parameters() if p.requires_grad])
    theirs.save_pretrained(tmp_path / "a")
    # PEFT's in-memory names carry the adapter name: "lora_A.default.weight" and the like.
    state = {k: v.contiguous() for k, v in theirs.state_dict().items() if ".default" in k}
    safetensors_torch.save_file(state, str(tmp_path / "a" / "adapter_model.safetensors"))
    mine = load_adapter(tiny_llama(), tmp_path / "a", dtype=torch.float32)
    torch.testing.assert_close(logits(mine, ids), logits(theirs, ids), atol=ATOL, rtol=0)


def test_loading_into_a_model_with_the_same_lora(tmp_path: Path, ids: torch.Tensor) -> None:
    mine = add_lora(tiny_llama(), r=8, alpha=16, dtype=torch.float32)
    perturb([p for p in mine.parameters() if p.requires_grad])
    save_adapter(mine, tmp_path / "a")
    again = add_lora(tiny_llama(), r=8, alpha=16, dtype=torch.float32)
    load_adapter(again, tmp_path / "a")
    torch.testing.assert_close(logits(again, ids), logits(mine, ids), atol=0, rtol=0)
    other_rank = add_lora(tiny_llama(), r=4, alpha=16)
    with pytest.raises(ValueError, match="already has LoRA"):
        load_adapter(other_rank, tmp_path / "a")


# --- errors -------------------------------------------------------------------------------------------------


def test_refuses_a_non_empty_folder_unless_overwrite(tmp_path: Path) -> None:
    model = add_lora(tiny_llama())
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite=True") as info:
        save_adapter(model, folder)
    assert str(folder) in str(info.value)
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    save_adapter(model, folder, overwrite=True)
    assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors", "notes.txt"]


def test_save_without_lora_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="add_lora"):
        save_adapter(tiny_llama(), tmp_path / "a")


def test_missing_folder_and_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    save_adapter(add_lora(tiny_llama()), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        load_adapter(tiny_llama(), tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny_llama(), tmp_path / "a")


def test_shape_mismatch_names_key_and_shapes(tmp_path: Path) -> None:
    save_adapter(add_lora(tiny_llama(), r=8, alpha=16), tmp_path / "a")
    other = tiny_llama(intermediate_size=96)  # same names, other shapes: a different base model
    with pytest.raises(ValueError, match="the adapter was made for an unnamed base model, not for this model") as info:
        load_adapter(other, tmp_path / "a")
    message = str(info.value)
    assert "mlp.down_proj.lora_A.weight" in message or "mlp.gate_proj.lora_B.weight" in message
    assert "(8, 128)" in message or "(128, 8)" in message
    assert "(8, 96)" in message or "(96, 8)" in message


def test_key_without_module_is_named(tmp_path: Path) -> None:
    save_adapter(add_lora(tiny_llama(), r=8, alpha=16), tmp_path / "a")
    with pytest.raises(ValueError, match=r"model\.layers\.1\..*matches no LoRA layer"):
        load_adapter(tiny_llama(num_hidden_layers=1), tmp_path / "a")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(bias="all"), "bias='all'"),
        (dict(peft_type="IA3"), "LoRA adapters only"),
        (dict(init_lora_weights="pissa"), "changed the base weights"),
        (dict(rank_pattern={"q_proj": 4}), "rank_pattern"),
    ],
)
def test_unsupported_configs_are_refused(change: dict, message: str, tmp_path: Path) -> None:
    save_adapter(add_lora(tiny_llama()), tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_llama(), tmp_path / "a")
