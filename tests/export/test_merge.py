"""merge() writes a folder transformers loads with the unmerged model's logits; quantize_model() a bnb checkpoint."""

import json

import pytest
import torch
from kbit_testing import bnb_dequantized, save_tiny_llama
from transformers import AutoModelForCausalLM

from kbit.export import merge, quantize_model, save_adapter
from kbit.lora import add_lora, lora_layers
from kbit.models import load_model

IDS = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))


def _trained_adapter(base, folder, dtype, **lora_kw):
    """An adapter with nonzero B (as after training) saved in PEFT format."""
    model = load_model(base, compute_dtype=dtype, device="cpu")
    add_lora(model, r=4, alpha=8, dropout=0.0, dtype=dtype, **lora_kw)
    g = torch.Generator().manual_seed(1)
    for _, layer in lora_layers(model):
        layer.lora_B.weight.data = (torch.randn(layer.lora_B.weight.shape, generator=g) * 0.05).to(dtype)
    save_adapter(model, folder)
    return model


@pytest.mark.parametrize("use_dora", [False, True])
def test_fp32_merge_matches_unmerged(tmp_path, smol_tokenizer_dir, use_dora):
    save_tiny_llama(tmp_path / "base", smol_tokenizer_dir)
    unmerged = _trained_adapter(tmp_path / "base", tmp_path / "adapter", torch.float32, use_dora=use_dora).eval()
    rep = merge(
        tmp_path / "base",
        tmp_path / "adapter",
        tmp_path / "merged",
        dtype=torch.float32,
        device="cpu",
        report_tokens=512,
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        a, b = unmerged(IDS).logits, merged(IDS).logits
    torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # same fp32 math, only the summation order differs
    assert 0 <= rep.kl < 1e-8 and abs(rep.ppl_change) < 1e-5
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["bits"] == 16
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()


def test_bf16_and_4bit_merges_report_their_cost(tmp_path, smol_tokenizer_dir):
    save_tiny_llama(tmp_path / "base", smol_tokenizer_dir)
    unmerged = _trained_adapter(tmp_path / "base", tmp_path / "adapter", torch.bfloat16).eval()
    r16 = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "m16", device="cpu", report_tokens=512)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m16", dtype=torch.bfloat16)
    with torch.no_grad():
        a, b = unmerged(IDS).logits.float(), merged(IDS).logits.float()
    assert (a - b).norm() / a.norm() < 2e-2  # bf16 rounding of the merged weight and of the activations
    r4 = merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "m4", bits=4, device="cpu", report_tokens=512)
    cfg = json.loads((tmp_path / "m4" / "config.json").read_text())
    assert cfg["quantization_config"]["load_in_4bit"] and cfg["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    # requantizing rounds most of the LoRA delta away: the 4-bit merge drifts far more than the bf16 one
    assert r4.kl > 10 * r16.kl
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "m4", device="cpu")


def test_quantize_model_loads_in_transformers_bitsandbytes(tmp_path, smol_tokenizer_dir):
    save_tiny_llama(tmp_path / "base", smol_tokenizer_dir, tie_word_embeddings=False)
    quantize_model(tmp_path / "base", tmp_path / "q4", device="cpu")
    ours = load_model(tmp_path / "base", device="cpu")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q4", device_map="cpu")  # bitsandbytes does the loading
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, bnb_dequantized(theirs)(IDS).logits)
    again = load_model(tmp_path / "q4", device="cpu")  # and kbit reads it back without requantizing
    assert again.kbit_load_config.pre_quantized
    key = "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(again.state_dict()[key], ours.state_dict()[key])
