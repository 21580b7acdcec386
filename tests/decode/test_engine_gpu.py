"""On the GPU: the CUDA-graph decoder with the fused kernels against transformers' generate on the same modules.

The model is a random bf16 Llama whose head is scaled up so that the top token usually leads by a wide margin. The
fused GEMV and norms sum in another order than cuBLAS and torch, so logits differ by about one bf16 ulp; where the
reference's two best logits are equal in bf16 (a tie its argmax breaks by index) either token is greedy. So the
tokens must equal transformers' up to the first such tie, and every token must be a greedy choice of transformers'
own logits for the sequence (its logit within one bf16 ulp of the best).
"""

from __future__ import annotations

import pytest
import torch

from kbit.decode import Decoder, decode, project
from kbit.lora import add_lora, lora_layers
from kbit.nn import Linear4bit

pytestmark = pytest.mark.gpu


def _model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=1024, max_position_embeddings=512)  # fmt: skip
    model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    head = model.get_output_embeddings()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, torch.nn.Linear) and mod is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, Linear4bit.from_linear(mod))
    add_lora(model, r=16, alpha=32, dropout=0.0)
    for _, layer in lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    return model.cuda()


def _reference(model, ids, n):
    out = model.generate(ids.view(1, -1), attention_mask=torch.ones(1, ids.numel(), dtype=torch.long, device="cuda"),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
    return out[0, ids.numel() :].tolist()


def _ulp(v: torch.Tensor) -> torch.Tensor:
    """One bf16 ulp at |v| (8 significant bits)."""
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))) - 7)


def assert_greedy(model, ids, ours, ref):
    """``ours`` equals ``ref`` up to the first reference tie, and each token is greedy under transformers' logits."""
    with torch.no_grad():
        seq = torch.cat([ids, torch.tensor(ours, device=ids.device)])
        logits = model(seq.view(1, -1)).logits[0, ids.numel() - 1 : -1].float()
    best = logits.max(-1).values
    picked = logits.gather(-1, torch.tensor(ours, device=ids.device).view(-1, 1))[:, 0]
    assert (picked >= best - _ulp(best)).all(), (picked - best).min().item()
    diverge = next((i for i, (a, b) in enumerate(zip(ours, ref, strict=True)) if a != b), None)
    if diverge is not None:  # only a tie in the reference may split the two sequences
        top2 = logits[diverge].topk(2).values
        assert top2[0] - top2[1] <= _ulp(top2[0]), (diverge, top2.tolist())


def test_projection_uses_the_fused_kernel_and_matches_the_module(monkeypatch):
    from kbit.kernels.triton import gemv4

    calls = []
    real = gemv4.gemv_4bit
    monkeypatch.setattr(gemv4, "gemv_4bit", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = _model()
    layer = model.model.layers[0].mlp.down_proj
    for rows in (1, 5):
        x = torch.randn(rows, layer.in_features, device="cuda", dtype=torch.bfloat16)
        ours, ref = project(layer, x), layer(x)
        assert ((ours.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert len(calls) == 1  # one row fused; five rows dequantize and multiply


def test_graph_decoder_tokens_equal_transformers():
    model = _model(1)
    ids = torch.randint(0, 1024, (32,), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    (ours,) = decode(model, [ids], 64, end_ids=[])
    assert model._kbit_decoder.graph is not None
    assert_greedy(model, ids, ours, _reference(model, ids, 64))
    assert len(set(ours)) > 3


def test_graph_replay_equals_eager_step():
    model = _model(2)
    ids = torch.randint(0, 1024, (9,), device="cuda")
    graphed, eager = Decoder(model, 1, 256, graph=True), Decoder(model, 1, 256, graph=False)
    tok = torch.stack([graphed.prefill(0, ids).argmax(), eager.prefill(0, ids).argmax()])
    assert tok[0] == tok[1]
    for _ in range(8):
        a, b = graphed.step(tok[:1]).clone(), eager.step(tok[1:])
        assert torch.equal(a, b)
        tok = torch.stack([a.argmax(-1)[0], b.argmax(-1)[0]])


def test_batch_rows_equal_single_prompts_on_gpu():
    model = _model(3)
    g = torch.Generator("cuda").manual_seed(1)
    prompts = [torch.randint(0, 1024, (t,), device="cuda", generator=g) for t in (5, 40, 17, 23)]
    batch = decode(model, prompts, 48, end_ids=[])
    for p, ours in zip(prompts, batch, strict=True):
        assert_greedy(model, p, ours, _reference(model, p, 48))


def test_adapter_changes_reach_the_captured_graph():
    """The stacked LoRA A copies are refreshed per decode: new adapter weights give transformers' new tokens."""
    model = _model(4)
    ids = torch.randint(0, 1024, (12,), device="cuda")
    before = decode(model, [ids], 32, end_ids=[])[0]
    graph = model._kbit_decoder.graph
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.mul_(-3.0)
            layer.lora_B.weight.normal_(0, 0.05)
    after = decode(model, [ids], 32, end_ids=[])[0]
    assert model._kbit_decoder.graph is graph  # the same capture, reading the refreshed copies
    assert after != before
    assert_greedy(model, ids, after, _reference(model, ids, 32))


def test_input_embeddings_in_host_memory_decode_the_same_tokens():
    """The trainer's memory mode keeps the embedding table on the CPU: the step looks rows up outside its graph."""
    from kbit.models.offload import offload_input_embeddings

    model = _model(5)
    ids = torch.randint(0, 1024, (7,), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    before = decode(model, [ids], 24, end_ids=[])
    assert "moved to CPU memory" in offload_input_embeddings(model)
    assert decode(model, [ids], 24, end_ids=[]) == before
    dec = model._kbit_decoder
    assert dec.host_rows is not None and dec.graph is not None


def test_adapters_switched_under_the_captured_graph_decode_their_own_tokens(tmp_path):
    """Two adapters on one model, switched in place under one captured graph: each decodes, token for token, what a
    model holding only it decodes; "base" (a recapture: the adapters are off) decodes the bare model's tokens."""
    from kbit.export import load_adapter, save_adapter
    from kbit.lora import set_adapter

    model = _model(6)  # its adapter is the one named "default" below
    gen = torch.Generator("cuda").manual_seed(6)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.normal_(0, 0.05, generator=gen)
            layer.lora_B.weight.normal_(0, 0.02, generator=gen)
    save_adapter(model, tmp_path / "b")
    only_a, only_b = _model(6), load_adapter(_model(6), tmp_path / "b")
    multi = load_adapter(_model(6), tmp_path / "b", name="b")
    ids = torch.randint(0, 1024, (20,), device="cuda", generator=torch.Generator("cuda").manual_seed(6))
    ref = {"default": decode(only_a, [ids], 48, end_ids=[])[0], "b": decode(only_b, [ids], 48, end_ids=[])[0]}
    assert ref["default"] != ref["b"]
    assert decode(multi, [ids], 48, end_ids=[])[0] == ref["default"]
    graph = multi._kbit_decoder.graph
    assert graph is not None
    for name in ("b", "default", "b"):
        set_adapter(multi, name)
        assert decode(multi, [ids], 48, end_ids=[])[0] == ref[name], name
        assert multi._kbit_decoder.graph is graph
    set_adapter(multi, "base")
    base = decode(multi, [ids], 48, end_ids=[])[0]
    assert multi._kbit_decoder.graph is not graph and base not in ref.values()
    assert_greedy(multi, ids, base, _reference(multi, ids, 48))
