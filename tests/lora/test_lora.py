"""kbit.lora against its stated math and against PEFT (forward, gradients, trainable-parameter counts).

Tolerances: fp32 adapters on an fp32 model compute the same products as PEFT in nearly the same order, so
logits and gradients agree to float32 rounding (measured: 0 for logits); 1e-5 leaves room for another
summation order.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from kbit_testing import tiny_llama  # noqa: E402

from kbit.lora import (  # noqa: E402
    LoRALinear,
    add_lora,
    lora_layers,
    print_trainable_parameters,
    trainable_parameters,
)

ATOL = 1e-5
PROJECTIONS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def randomize(model: nn.Module, seed: int = 1) -> None:
    """Give every adapter a nonzero B (and DoRA a perturbed magnitude) so it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            w = layer.lora_B.weight
            w.copy_(0.1 * torch.randn(w.shape, generator=gen))
            if layer.use_dora:
                m = layer.lora_magnitude_vector
                m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen))


def peft_twin(base: nn.Module, kbit_model: nn.Module, **lora_kwargs) -> nn.Module:
    """PEFT's LoRA on a copy of ``base`` with the adapter values of ``kbit_model`` copied in."""
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs))
    with torch.no_grad():
        for path, layer in lora_layers(kbit_model):
            theirs = twin.base_model.model.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(layer.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(layer.lora_B.weight)
            if layer.use_dora:
                theirs.lora_magnitude_vector["default"].weight.copy_(layer.lora_magnitude_vector)
    return twin


# --- the layer on its own -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_rslora, scale", [(False, 8 / 4), (True, 8 / math.sqrt(4))])
def test_layer_is_the_lora_formula(use_rslora: bool, scale: float) -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    layer = LoRALinear(base, r=4, alpha=8, use_rslora=use_rslora, dtype=torch.float32).eval()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 5, 32)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected = x @ base.weight.T + base.bias + scale * (x @ a.T @ b.T)
    assert layer.scale == pytest.approx(scale)
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)


def test_init_kaiming_starts_as_identity() -> None:
    torch.manual_seed(0)
    base = nn.Linear(4096, 8, bias=False)
    layer = LoRALinear(base, r=16, alpha=32, dtype=torch.float32)
    a = layer.lora_A.weight
    bound = 1 / math.sqrt(4096)  # kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in))
    assert a.abs().max() <= bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # 65k samples: std error ~0.3%
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    x = torch.randn(2, 4096)
    assert torch.equal(layer(x), base(x))


def test_init_gaussian_std_is_one_over_r() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(4096, 8), r=8, alpha=16, init="gaussian", dtype=torch.float32)
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 8, rel=0.03)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_adapter_dtype_and_output_dtype() -> None:
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8)  # default adapter dtype: bf16
    assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 16)).dtype == torch.float32  # the base output's dtype
    dora = LoRALinear(base, r=4, alpha=8, use_dora=True)
    assert dora.lora_magnitude_vector.dtype == torch.bfloat16


def test_dora_is_the_dora_formula() -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=True)
    layer = LoRALinear(base, r=4, alpha=8, use_dora=True, dtype=torch.float32).eval()
    # m starts at the row norms of W (B = 0), so DoRA starts as the identity.
    torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1), atol=1e-6, rtol=0)
    nn.init.normal_(layer.lora_B.weight)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.5)
    x = torch.randn(3, 32)
    v = base.weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight  # W + s·B·A
    expected = x @ (layer.lora_magnitude_vector.view(-1, 1) * v / v.norm(dim=1, keepdim=True)).T + base.bias
    torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(F.linear(x, layer.merged_weight(), base.bias), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_dropout_only_in_train_mode(use_dora: bool) -> None:
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5, use_dora=use_dora, dtype=torch.float32)
    no_dropout = LoRALinear(base, r=4, alpha=8, dropout=0.0, use_dora=use_dora, dtype=torch.float32).eval()
    nn.init.normal_(layer.lora_B.weight)
    no_dropout.load_state_dict(layer.state_dict())
    x = torch.randn(8, 64)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))  # a fresh mask each call
    layer.eval()
    torch.testing.assert_close(layer(x), no_dropout(x), atol=0, rtol=0)


def test_merged_weight_equals_eval_forward() -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=False)
    layer = LoRALinear(base, r=4, alpha=8, dtype=torch.float32).eval()
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(5, 32)
    torch.testing.assert_close(x @ layer.merged_weight().T, layer(x), atol=ATOL, rtol=0)


# --- add_lora on a transformers model -----------------------------------------------------------------------


def test_all_linear_wraps_every_projection_but_not_the_head() -> None:
    model = add_lora(tiny_llama())
    wrapped = [path for path, _ in lora_layers(model)]
    assert len(wrapped) == 2 * 7
    assert sorted({p.rsplit(".", 1)[-1] for p in wrapped}) == PROJECTIONS
    assert isinstance(model.lm_head, nn.Linear)
    # The base keeps its state-dict keys below base_layer; nothing else about it changes.
    keys = model.state_dict().keys()
    assert "model.layers.0.self_attn.q_proj.base_layer.weight" in keys
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in keys


def test_names_follow_peft_matching() -> None:
    model = add_lora(tiny_llama(), target_modules=["q_proj", "layers.1.mlp.down_proj"])
    wrapped = [path for path, _ in lora_layers(model)]
    assert wrapped == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
    ]
    regex = add_lora(tiny_llama(), target_modules=r"model\.layers\.0\.self_attn\.(q|v)_proj")
    assert [p for p, _ in lora_layers(regex)] == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.v_proj",
    ]


def test_only_adapter_parameters_train_and_gradients_reach_a_and_b() -> None:
    model = add_lora(tiny_llama(), r=4, alpha=8, dtype=torch.float32)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 7 * 2
    assert all(name.endswith(("lora_A.weight", "lora_B.weight")) for name in trainable)

    ids = torch.randint(0, 256, (2, 10))
    model(ids, labels=ids).loss.backward()
    first = model.model.layers[0].self_attn.q_proj
    # With B = 0 the first step moves only B: dL/dA = s · B^T (dL/dy) x^T = 0 exactly.
    assert torch.count_nonzero(first.lora_A.weight.grad) == 0
    assert first.lora_B.weight.grad.abs().sum() > 0
    assert first.base_layer.weight.grad is None
    assert model.model.embed_tokens.weight.grad is None

    model.zero_grad()
    randomize(model)
    model(ids, labels=ids).loss.backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A.weight.grad.abs().sum() > 0
        assert layer.lora_B.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=16, alpha=32),
        dict(r=8, alpha=16, use_rslora=True),
        dict(r=8, alpha=16, use_dora=True),
        dict(r=4, alpha=4, target_modules=["q_proj", "v_proj"], use_dora=True),
    ],
    ids=["defaults", "rslora", "dora", "list-dora"],
)
def test_logits_and_gradients_match_peft(kwargs: dict) -> None:
    base = tiny_llama()
    mine = add_lora(copy.deepcopy(base), dropout=0.0, dtype=torch.float32, **kwargs)
    randomize(mine)
    peft_kwargs = dict(
        r=kwargs["r"],
        lora_alpha=kwargs["alpha"],
        lora_dropout=0.0,
        target_modules=kwargs.get("target_modules", "all-linear"),
        use_rslora=kwargs.get("use_rslora", False),
        use_dora=kwargs.get("use_dora", False),
    )
    theirs = peft_twin(base, mine, **peft_kwargs)
    ids = torch.randint(0, 256, (2, 12))
    mine_out, theirs_out = mine(ids, labels=ids), theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(mine_out.logits, theirs_out.logits, atol=ATOL, rtol=0)
    mine_out.loss.backward()
    theirs_out.loss.backward()
    # Gradients agree too, so DoRA's detached norm is detached exactly where PEFT detaches it.
    for path, layer in lora_layers(mine):
        other = theirs.base_model.model.get_submodule(path)
        torch.testing.assert_close(layer.lora_A.weight.grad, other.lora_A["default"].weight.grad, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.weight.grad, other.lora_B["default"].weight.grad, atol=ATOL, rtol=1e-4)
        if layer.use_dora:
            torch.testing.assert_close(
                layer.lora_magnitude_vector.grad,
                other.lora_magnitude_vector["default"].weight.grad,
                atol=ATOL,
                rtol=1e-4,
            )


@pytest.mark.parametrize("use_dora", [False, True])
def test_train_mode_dropout_matches_peft(use_dora: bool) -> None:
    # Both libraries draw one dropout mask per layer in model order, so the same seed gives the same masks.
    base = tiny_llama()
    mine = add_lora(copy.deepcopy(base), r=8, alpha=16, dropout=0.3, use_dora=use_dora, dtype=torch.float32)
    randomize(mine)
    theirs = peft_twin(base, mine, r=8, lora_alpha=16, lora_dropout=0.3, target_modules="all-linear", use_dora=use_dora)
    mine.train()
    theirs.train()
    ids = torch.randint(0, 256, (2, 12))
    torch.manual_seed(7)
    ours = mine(ids).logits
    torch.manual_seed(7)
    reference = theirs(input_ids=ids).logits
    torch.manual_seed(8)
    assert not torch.allclose(mine(ids).logits, ours)  # dropout is active
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(r=16, alpha=32),
        dict(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
        dict(r=8, alpha=16, use_dora=True),
    ],
    ids=["all-linear", "list", "dora"],
)
def test_trainable_counts_match_peft(kwargs: dict, capsys: pytest.CaptureFixture) -> None:
    base = tiny_llama()
    mine = add_lora(copy.deepcopy(base), **kwargs)
    config = peft.LoraConfig(
        r=kwargs["r"],
        lora_alpha=kwargs["alpha"],
        target_modules=kwargs.get("target_modules", "all-linear"),
        use_dora=kwargs.get("use_dora", False),
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    assert trainable_parameters(mine) == theirs.get_nb_trainable_parameters()
    print_trainable_parameters(mine)
    theirs.print_trainable_parameters()
    mine_line, theirs_line = capsys.readouterr().out.splitlines()
    assert mine_line == theirs_line
    assert mine_line.startswith("trainable params: ")


def test_modules_to_save_is_a_trainable_copy() -> None:
    base = tiny_llama()
    mine = add_lora(copy.deepcopy(base), r=8, alpha=16, modules_to_save=["lm_head"])
    assert mine.lm_head is not base.lm_head and mine.lm_head.weight.requires_grad
    torch.testing.assert_close(mine.lm_head.weight, base.lm_head.weight, atol=0, rtol=0)
    assert not any(path == "lm_head" for path, _ in lora_layers(mine))
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"]),
    )
    trainable, total = theirs.get_nb_trainable_parameters()
    # PEFT keeps the frozen original head beside its copy; kbit keeps only the copy.
    assert trainable_parameters(mine) == (trainable, total - base.lm_head.weight.numel())


def test_modules_to_save_unties_a_shared_head() -> None:
    base = tiny_llama(tie_word_embeddings=True)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    mine = add_lora(copy.deepcopy(base), r=8, alpha=16, modules_to_save=["lm_head"])
    assert mine.lm_head.weight is not mine.model.embed_tokens.weight
    assert mine.lm_head.weight.requires_grad and not mine.model.embed_tokens.weight.requires_grad
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", modules_to_save=["lm_head"]),
    )
    assert trainable_parameters(mine) == theirs.get_nb_trainable_parameters()  # tied: PEFT's original counts once


# --- errors -------------------------------------------------------------------------------------------------


def test_unknown_target_name_lists_the_linear_layers() -> None:
    with pytest.raises(ValueError, match="q_prj") as info:
        add_lora(tiny_llama(), target_modules=["q_proj", "q_prj"])
    assert all(name in str(info.value) for name in PROJECTIONS + ["lm_head"])


def test_non_linear_target_is_refused() -> None:
    with pytest.raises(ValueError, match="LlamaMLP"):
        add_lora(tiny_llama(), target_modules=["mlp"])


def test_second_add_lora_is_refused() -> None:
    model = add_lora(tiny_llama())
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora(model)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(r=0), "r must be"), (dict(init="xavier"), "init must be"), (dict(dropout=1.0), "dropout must be")],
)
def test_bad_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        add_lora(tiny_llama(), **kwargs)


# --- kbit's quantized bases (run once kbit.nn is importable) ------------------------------------------------


def quantized_twins(
    compute_dtype: torch.dtype, kind: str = "Linear4bit", head: bool = False
) -> tuple[nn.Module, nn.Module]:
    """(model with kbit quantized linears, plain model holding those layers' dequantized weights)."""
    knn = pytest.importorskip("kbit.nn")
    quantized, plain = tiny_llama(), tiny_llama()
    for path, module in list(quantized.named_modules()):
        if isinstance(module, nn.Linear) and (head or path != "lm_head"):
            layer = getattr(knn, kind).from_linear(module, compute_dtype=compute_dtype)
            parent, _, name = path.rpartition(".")
            setattr(quantized.get_submodule(parent), name, layer)
            with torch.no_grad():
                plain.get_submodule(path).weight.copy_(layer.dequantize(torch.float32))
    return quantized, plain


@pytest.mark.parametrize("kind, use_dora", [("Linear4bit", False), ("Linear4bit", True), ("Linear8bit", True)])
def test_quantized_base_matches_peft_on_dequantized_weights(kind: str, use_dora: bool) -> None:
    # fp32 compute: the quantized layer multiplies by exactly its dequantized weight, so fp32 tolerance holds.
    quantized, plain = quantized_twins(torch.float32, kind)
    mine = add_lora(quantized, r=8, alpha=16, dropout=0.0, use_dora=use_dora, dtype=torch.float32)
    randomize(mine)
    theirs = peft_twin(plain, mine, r=8, lora_alpha=16, target_modules="all-linear", use_dora=use_dora)
    assert trainable_parameters(mine) == theirs.get_nb_trainable_parameters()  # logical in×out for packed weights
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, theirs(input_ids=ids).logits, atol=ATOL, rtol=0)


def test_linear4bit_bf16_compute_matches_peft_within_bf16_rounding() -> None:
    quantized, plain = quantized_twins(torch.bfloat16)
    mine = add_lora(quantized, r=8, alpha=16, dropout=0.0)  # bf16 adapters on bf16 compute: the QLoRA default
    randomize(mine)
    theirs = peft_twin(plain, mine, r=8, lora_alpha=16, target_modules="all-linear")
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        ours, reference = mine(ids).logits, theirs(input_ids=ids).logits
    # bf16 keeps 8 significant bits (relative rounding 2^-9); ~10 roundings in series through 2 layers stay
    # well under 3% of the logit scale.
    assert (ours - reference).abs().max() <= 0.03 * reference.abs().max()
    ids_grad = torch.randint(0, 256, (2, 12))
    mine.train()
    mine(ids_grad, labels=ids_grad).loss.backward()
    assert all(layer.lora_A.weight.grad.abs().sum() > 0 for _, layer in lora_layers(mine))


def test_quantized_head_in_modules_to_save_becomes_a_dense_trainable_copy(tmp_path) -> None:
    from kbit.export import save_adapter

    quantized, plain = quantized_twins(torch.float32, head=True)
    mine = add_lora(quantized, r=8, alpha=16, dropout=0.0, modules_to_save=["lm_head"], dtype=torch.float32)
    assert isinstance(mine.lm_head, nn.Linear) and mine.lm_head.weight.requires_grad
    torch.testing.assert_close(mine.lm_head.weight, plain.lm_head.weight, atol=0, rtol=0)
    randomize(mine)
    with torch.no_grad():
        mine.lm_head.weight.mul_(1.1)
    save_adapter(mine, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(plain, tmp_path / "a").eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(mine(ids).logits, theirs(input_ids=ids).logits, atol=ATOL, rtol=0)
