"""The static-cache decoder gives, token for token, what transformers' ``generate`` gives for the same model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kbit_testing import TINY

from kbit.decode import Decoder, decode, unsupported_reason
from kbit.export import load_adapter, save_adapter
from kbit.lora import add_lora, lora_layers, set_adapter
from kbit.nn import Linear4bit


def _base(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    """A random tiny model of ``family`` with 2 KV heads (GQA)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, num_key_value_heads=2, **(TINY | extra))
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.generation_config.eos_token_id = None  # decode the full length on both sides
    return model


def _model(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    """:func:`_base` with LoRA on every linear with a non-zero B."""
    model = _base(family, seed, **extra)
    add_lora(model, r=4, alpha=8, dropout=0.0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def _reference(model, ids: torch.Tensor, n: int) -> list[int]:
    out = model.generate(ids.view(1, -1), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, ids.numel() :].tolist()


def _assert_greedy(model, ids: torch.Tensor, ours: list[int]) -> None:
    """``ours`` equals transformers' ``generate``, or where generate's cached steps part from the model's own forward
    (transformers 5.17 with torch 2.11 picks a token at step 46 here that its full forward ranks second by 1.3e-3),
    every token is the argmax of transformers' full forward over the prefix (float32 noise aside)."""
    if ours == _reference(model, ids, len(ours)):
        return
    with torch.no_grad():
        seq = torch.cat([ids, torch.tensor(ours)])
        logits = model(seq.view(1, -1)).logits[0, ids.numel() - 1 : -1].float()
    best = logits.max(-1).values
    picked = logits.gather(-1, torch.tensor(ours).view(-1, 1))[:, 0]
    assert (picked >= best - 1e-5 * (1 + best.abs())).all(), (picked - best).min().item()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_greedy_tokens_equal_transformers(family):
    model = _model(family)
    ids = torch.randint(0, 256, (11,), generator=torch.Generator().manual_seed(1))
    (ours,) = decode(model, [ids], 64, end_ids=[])
    assert len(ours) == 64
    _assert_greedy(model, ids, ours)
    assert len(set(ours)) > 4  # a real continuation, not one repeated token


def test_quantized_base_with_adapter():
    """Linear4bit bases under LoRA (what kbit loads): same tokens as transformers' generate on the same modules."""
    model = _model("llama", seed=3)
    for _, layer in lora_layers(model):
        layer.base_layer = Linear4bit.from_linear(layer.base_layer, compute_dtype=torch.float32)
    ids = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(2))
    assert decode(model, [ids], 64, end_ids=[])[0] == _reference(model, ids, 64)


def test_batch_rows_equal_single_prompts():
    model = _model("qwen2", seed=5)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (t,), generator=g) for t in (3, 17, 9)]
    batch = decode(model, prompts, 40, end_ids=[])
    assert batch == [decode(model, [p], 40, end_ids=[])[0] for p in prompts]


def test_rows_stop_at_their_end_token():
    model = _model("llama", seed=7)
    ids = torch.randint(0, 256, (5,), generator=torch.Generator().manual_seed(4))
    (full,) = decode(model, [ids], 30, end_ids=[])
    end = full[10]
    (cut,) = decode(model, [ids], 30, end_ids=[end])
    first = full.index(end)
    assert cut == full[: first + 1]


def test_cache_is_reused_and_regrown():
    model = _model("llama")
    ids = torch.arange(5)
    decode(model, [ids], 8, end_ids=[])
    first = model._kbit_decoder
    assert isinstance(first, Decoder) and first.max_len == 256 and first.batch == 1
    decode(model, [ids], 20, end_ids=[])
    assert model._kbit_decoder is first
    decode(model, [ids, ids], 8, end_ids=[])
    assert model._kbit_decoder is not first and model._kbit_decoder.batch == 2


def test_unsupported_families_are_named():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, vocab_size=64))  # fmt: skip
    assert "gpt_neox" in unsupported_reason(model)
    with pytest.raises(ValueError, match="gpt_neox"):
        Decoder(model, 1, 16)


def test_sliding_window_longer_than_the_reply_is_exact_and_shorter_is_refused():
    model = _model("mistral", sliding_window=64)
    ids = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(8))
    assert unsupported_reason(model, 40) is None
    assert decode(model, [ids], 30, end_ids=[])[0] == _reference(model, ids, 30)
    assert "sliding-window" in unsupported_reason(model, 100)
    with pytest.raises(ValueError, match="sliding-window"):
        Decoder(model, 1, 100)


def test_the_cached_decoder_follows_an_adapter_switch(tmp_path):
    """Adapters of one scale switch under the same decoder; another scale, or none, gets a new one. Each gives the
    tokens of a model holding only that adapter."""
    model = _model("llama", seed=9)
    save_adapter(model, tmp_path / "a")
    for alpha, name in ((8, "b"), (16, "c")):
        torch.manual_seed(alpha)
        for _, layer in lora_layers(model):
            torch.nn.init.normal_(layer.lora_A.weight, std=0.2)
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        model.lora_settings = dataclasses.replace(model.lora_settings, alpha=alpha)
        save_adapter(model, tmp_path / name)
    ids = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(9))
    alone = {n: decode(load_adapter(_base("llama", 9), tmp_path / n), [ids], 24, end_ids=[])[0] for n in "abc"}
    alone["base"] = decode(_base("llama", 9), [ids], 24, end_ids=[])[0]
    assert len({tuple(t) for t in alone.values()}) == 4

    multi = _base("llama", 9)
    for name in "abc":
        load_adapter(multi, tmp_path / name, name=name)
    assert decode(multi, [ids], 24, end_ids=[])[0] == alone["a"]
    cached = multi._kbit_decoder
    for name in ("b", "a", "b"):
        set_adapter(multi, name)
        assert decode(multi, [ids], 24, end_ids=[])[0] == alone[name]
        assert multi._kbit_decoder is cached  # the same decoder, reading the copied tensors
    for name in ("c", "base", "a"):
        before = multi._kbit_decoder
        set_adapter(multi, name)
        assert decode(multi, [ids], 24, end_ids=[])[0] == alone[name], name
        assert multi._kbit_decoder is not before  # a new scale or on/off: a graph holds these as constants
