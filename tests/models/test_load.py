"""load_model: every supported family's 4-bit logits equal transformers + bitsandbytes 4-bit on the same weights."""

import json

import pytest
import torch
from kbit_testing import FAMILY_CONFIGS, TINY, bnb_dequantized
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

from kbit.models import load_model
from kbit.nn import Linear4bit, Linear8bit


def _save_random(model_type: str, folder, seed=0, **save_kw):
    kw = dict(TINY, **FAMILY_CONFIGS[model_type])
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder, **save_kw)
    return model


def _bnb_4bit(folder, dq=True, quant_type="nf4", storage=torch.uint8):
    qc = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=dq,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=storage,
    )
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=qc, dtype=torch.bfloat16, device_map="cpu")


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", list(FAMILY_CONFIGS))
def test_family_matches_transformers_bitsandbytes(model_type, tmp_path):
    _save_random(model_type, tmp_path)
    ours = load_model(tmp_path, device="cpu")
    ref = _bnb_4bit(tmp_path)
    n4 = sum(isinstance(m, Linear4bit) for m in ours.modules())
    assert n4 == sum(type(m).__name__ == "Linear4bit" for m in ref.modules()) > 0
    with torch.no_grad():
        a, b = ours(IDS).logits.float(), bnb_dequantized(ref)(IDS).logits.float()
    # Same packed bytes, same dequantized bf16 weights, same bf16 matmuls: the logits are identical.
    assert torch.equal(a, b)


def test_packed_weights_identical_to_bitsandbytes(tmp_path):
    _save_random("llama", tmp_path)
    ours, ref = load_model(tmp_path, device="cpu"), _bnb_4bit(tmp_path)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    key = "model.layers.1.mlp.down_proj.weight"
    for suffix in ("", ".absmax", ".nested_absmax", ".quant_map", ".nested_quant_map"):
        assert torch.equal(sd_ours[key + suffix], sd_ref[key + suffix]), suffix


def test_sharded_folder_and_bits16(tmp_path):
    plain = _save_random("qwen2", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    m16 = load_model(tmp_path, bits=16, compute_dtype=torch.float32, device="cpu")
    assert not any(isinstance(m, (Linear4bit, Linear8bit)) for m in m16.modules())
    with torch.no_grad():
        torch.testing.assert_close(m16(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=1e-5)
    m4 = load_model(tmp_path, device="cpu")
    assert sum(isinstance(m, Linear4bit) for m in m4.modules()) == 2 * 7


def test_bitsandbytes_checkpoint_loads_without_requantizing(tmp_path):
    _save_random("llama", tmp_path / "src")
    ref = _bnb_4bit(tmp_path / "src", dq=True, quant_type="fp4")
    ref.save_pretrained(tmp_path / "bnb")
    assert "quantization_config" in json.loads((tmp_path / "bnb" / "config.json").read_text())
    ours = load_model(tmp_path / "bnb", device="cpu")
    assert ours.kbit_load_config.pre_quantized and ours.kbit_load_config.quant_type == "fp4"
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(ours.state_dict()[key], ref.state_dict()[key])
    with torch.no_grad():
        assert torch.equal(ours(IDS).logits, bnb_dequantized(ref)(IDS).logits)


def test_int8_bits(tmp_path):
    _save_random("llama", tmp_path)
    m8 = load_model(tmp_path, bits=8, device="cpu")
    assert sum(isinstance(m, Linear8bit) for m in m8.modules()) == 14
    m16 = load_model(tmp_path, bits=16, device="cpu")
    with torch.no_grad():
        a, b = m8(IDS).logits.float(), m16(IDS).logits.float()
    assert (a - b).norm() / b.norm() < 0.03  # int8 rows: ~0.5% weight error


def test_skip_modules(tmp_path):
    _save_random("llama", tmp_path)
    m = load_model(tmp_path, skip_modules=("lm_head", "down_proj"), device="cpu")
    assert type(m.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(m.model.layers[0].mlp.up_proj, Linear4bit)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_model(tmp_path / "empty")
    _save_random("llama", tmp_path / "m")
    for f in (tmp_path / "m").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match=r"has no \*\.safetensors weights"):
        load_model(tmp_path / "m")
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        load_model(tmp_path / "m", bits=3)
    cfg = AutoConfig.for_model("t5", d_model=32, num_layers=1, num_heads=2, d_ff=64, vocab_size=64)
    cfg.save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="is not a causal LM that transformers implements"):
        load_model(tmp_path / "t5")
