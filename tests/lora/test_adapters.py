"""Several adapters on one base: each switched in equals a model holding only it, bit for bit, and mismatches fail."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kbit_testing import tiny_llama

from kbit.export import load_adapter, save_adapter
from kbit.lora import active_adapter, adapter_tensors, add_lora, list_adapters, lora_layers, set_adapter

IDS = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _save(folder: Path, seed: int, **lora) -> Path:
    """An adapter of tiny_llama() with random A and B (seeded), saved to ``folder``."""
    model = add_lora(tiny_llama(), dropout=0.0, **({"r": 4, "alpha": 8} | lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in adapter_tensors(model).values():
            t.copy_(0.1 * torch.randn(t.shape, generator=gen))
    return save_adapter(model, folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": _save(root / "a", 1),
        "b": _save(root / "b", 2, alpha=16, use_rslora=True),  # another scale: alpha / sqrt(r)
        "r8": _save(root / "r8", 3, r=8),
        "qv": _save(root / "qv", 4, target_modules=["q_proj", "v_proj"]),
        "dora": _save(root / "dora", 5, use_dora=True),
    }


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: t.detach().clone() for k, t in adapter_tensors(model).items()}


def test_each_adapter_equals_a_model_holding_only_it(folders):
    model = load_adapter(tiny_llama(), folders["a"], name="a")
    load_adapter(model, folders["b"], name="b")
    assert list_adapters(model) == ["a", "b"] and active_adapter(model) == "a"
    only_a, only_b = load_adapter(tiny_llama(), folders["a"]), load_adapter(tiny_llama(), folders["b"])
    bare = _logits(tiny_llama())
    first = _snapshot(model)
    params = [id(p) for p in model.parameters()]

    assert torch.equal(_logits(model), _logits(only_a))
    set_adapter(model, "b")
    assert torch.equal(_logits(model), _logits(only_b))
    assert model.lora_settings == only_b.lora_settings  # save_adapter writes the active adapter
    set_adapter(model, "base")
    assert active_adapter(model) is None and torch.equal(_logits(model), bare)
    set_adapter(model, None)
    assert torch.equal(_logits(model), bare)
    for name in ("a", "b", "a", "b", "a"):
        set_adapter(model, name)
    assert all(torch.equal(t, first[k]) for k, t in adapter_tensors(model).items())
    assert [id(p) for p in model.parameters()] == params  # values copied in place, never new Parameters
    assert not (_logits(model) - _logits(only_a)).any() and (_logits(only_a) - _logits(only_b)).abs().max() > 1e-3


def test_the_active_adapter_is_saved_and_keeps_its_changes(folders, tmp_path):
    model = load_adapter(tiny_llama(), folders["a"], name="a")
    load_adapter(model, folders["b"], name="b")
    with torch.no_grad():  # as a training step would: the live adapter changes, and must survive a switch
        next(lora_layers(model))[1].lora_B.weight.add_(1.0)
    changed = _snapshot(model)
    set_adapter(model, "b")
    save_adapter(model, tmp_path / "b-again")
    config = json.loads((tmp_path / "b-again" / "adapter_config.json").read_text())
    assert config["lora_alpha"] == 16 and config["use_rslora"]
    assert torch.equal(_logits(load_adapter(tiny_llama(), tmp_path / "b-again")), _logits(model))
    set_adapter(model, "a")
    assert all(torch.equal(t, changed[k]) for k, t in adapter_tensors(model).items())


def test_an_add_lora_adapter_is_default_and_others_join_it(folders):
    model = add_lora(tiny_llama(), r=4, alpha=8, dropout=0.0)
    load_adapter(model, folders["a"], name="a")
    assert list_adapters(model) == ["default", "a"] and active_adapter(model) == "default"
    assert list_adapters(tiny_llama()) == [] and active_adapter(tiny_llama()) is None
    fresh = load_adapter(tiny_llama(), folders["a"])
    assert list_adapters(fresh) == ["default"]


def test_mismatches_name_both_adapters_and_the_first_layer(folders):
    model = load_adapter(tiny_llama(), folders["a"], name="a")
    first = "model.layers.0.self_attn"
    with pytest.raises(ValueError, match=rf"adapter 'r8' .* does not match adapter 'a' at {first}.q_proj: "
                       r"lora_A.weight is \(8, 64\) in 'r8' but \(4, 64\) in 'a' \(another rank\)"):  # fmt: skip
        load_adapter(model, folders["r8"], name="r8")
    with pytest.raises(ValueError, match=rf"'qv' .* at {first}.k_proj: lora_A.weight is in 'a' but not in 'qv'"):
        load_adapter(model, folders["qv"], name="qv")
    with pytest.raises(ValueError, match=rf"at {first}.q_proj: lora_magnitude_vector is in 'dora' but not in 'a'"):
        load_adapter(model, folders["dora"], name="dora")
    with pytest.raises(ValueError, match="an adapter named 'a' is already loaded"):
        load_adapter(model, folders["a"], name="a")
    with pytest.raises(ValueError, match="'base' is not allowed"):
        load_adapter(model, folders["a"], name="base")
    with pytest.raises(ValueError, match=r"unknown adapter 'c'; loaded: a \(or 'base' for none\)"):
        set_adapter(model, "c")
    assert list_adapters(model) == ["a"]  # nothing half-added


def test_an_adapter_for_another_base_is_refused(folders):
    wide = load_adapter(tiny_llama(intermediate_size=96), _retarget(folders, intermediate_size=96), name="x")
    with pytest.raises(ValueError, match="made for an unnamed base model, not for this model"):
        load_adapter(wide, folders["a"], name="a")
    short = load_adapter(tiny_llama(num_hidden_layers=1), _retarget(folders, num_hidden_layers=1), name="x")
    with pytest.raises(ValueError, match=r"model\.layers\.1\..* matches no layer of LlamaForCausalLM"):
        load_adapter(short, folders["a"], name="a")


def _retarget(folders: dict[str, Path], **overrides) -> Path:
    """An r=4 adapter for tiny_llama(**overrides), saved beside the others."""
    folder = folders["a"].parent / f"other-{sorted(overrides.items())}"
    if not folder.exists():
        save_adapter(add_lora(tiny_llama(**overrides), r=4, alpha=8), folder)
    return folder


def test_saved_modules_switch_but_the_base_cannot_run(tmp_path):
    folders = [_save(tmp_path / n, seed, modules_to_save=["lm_head"]) for n, seed in (("a", 6), ("b", 7))]
    model = load_adapter(tiny_llama(), folders[0], name="a")
    load_adapter(model, folders[1], name="b")
    set_adapter(model, "b")
    assert torch.equal(_logits(model), _logits(load_adapter(tiny_llama(), folders[1])))
    with pytest.raises(ValueError, match=r"replace \['lm_head'\] \(modules_to_save\)"):
        set_adapter(model, "base")
