"""GGUF export: transformers' GGUF loader reads the file back to the same model, tokenizer and chat template.

Tolerances. The file stores each matrix rounded to its type, and transformers' loader dequantizes with the
same gguf code, so the reloaded model must equal the original with its matrices rounded the same way
(measured difference: 0; 1e-6 allows for the fp32 rms_norm_eps the file stores). Against the unrounded fp32
original the error is the format's (tiny random model, logits of max |.| ~3.2): max |delta| / max |logit|
measured 7.3e-4 (f16), 6.2e-3 (bf16), 1.8e-2 (q8_0); the bounds below leave ~3x.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from kbit.export.gguf import _llama3_rope_factors, export_gguf, rotary_halves_to_interleaved  # noqa: E402

ATOL_ROUNDED = 1e-6
REL_BOUND = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 5e-2}
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda: pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    ),
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "Hello world! 123 + 456 = 579",
    "  multiple   spaces\n\nnew lines",
    "Café déjà vu, naïve façade. <think>hmm</think>",
] * 20
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 12 + 345?  Answer in   spaces,\n\nplease: café <think>"},
]


def byte_level_tokenizer(pre: str = "smollm"):
    """A ~350-token byte-level BPE with ChatML specials, a user-defined token and a chat template.

    Small on purpose: transformers parses a GGUF vocabulary in Python (SmolLM2's 49k tokens: ~15 s a load).
    ``llama-bpe`` also adds BOS through its post-processor, as Llama 3's tokenizer does.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(["<think>"])
    if pre == "llama-bpe":
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>" if pre == "llama-bpe" else "<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_model(vocab_size: int, arch: str = "llama", seed: int = 0, **overrides):
    """Random fp32 model (hidden 64, 2 layers, 4 heads / 2 kv heads); ffn 80 is not a multiple of 32."""
    torch.manual_seed(seed)
    config = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=80,
        vocab_size=vocab_size,
        initializer_range=0.1,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    config.update(overrides)
    if arch == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**config)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def save_folder(folder: Path, model, tokenizer, **save_kwargs) -> Path:
    model.save_pretrained(folder, **save_kwargs)
    tokenizer.save_pretrained(folder)
    return folder


def load_gguf_model(path: Path):
    # Alone in its folder: beside a tokenizer_config.json / chat_template.jinja, transformers mixes those in.
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()


def load_gguf_tokenizer(path: Path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rounded_like_file(model, out_type: str):
    """A copy of ``model`` whose matrices are rounded as export_gguf stores them (1-D tensors stay fp32)."""
    qtype = gguf.GGMLQuantizationType[out_type.upper()]
    state = {}
    for name, w in model.state_dict().items():
        if w.ndim == 2:
            t = qtype if qtype.name != "Q8_0" or w.shape[-1] % 32 == 0 else gguf.GGMLQuantizationType.F16
            w = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), t), t).copy())
        state[name] = w
    rounded = type(model)(model.config).eval()
    rounded.load_state_dict(state)
    return rounded


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    model = tiny_model(len(tokenizer) + 3)  # 3 embedding rows without a token: written as [PAD…] tokens
    return save_folder(tmp_path_factory.mktemp("tiny") / "tiny-llama", model, tokenizer), model


@pytest.fixture
def out_dir(tmp_path) -> Path:
    out = tmp_path / "gguf"
    out.mkdir()
    return out


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
def test_round_trip_logits(model_dir, tokenizer, out_dir, out_type):
    folder, model = model_dir
    if out_type == "q8_0":
        with pytest.warns(UserWarning, match="down_proj.weight: rows of 80 .* F16 instead of Q8_0"):
            path = export_gguf(folder, out_dir / "m.gguf", out_type)
    else:
        path = export_gguf(folder, out_dir / "m.gguf", out_type)
    assert path == out_dir / "m.gguf"
    assert [p.name for p in out_dir.iterdir()] == ["m.gguf"]  # no temporary file left behind

    matrix = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0"}[out_type]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == types["output.weight"] == types["blk.1.attn_q.weight"] == matrix
    assert types["blk.0.ffn_down.weight"] == ("F16" if out_type == "q8_0" else matrix)
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert len(types) == 2 * 9 + 3

    ids = torch.tensor([tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=True)["input_ids"]])
    got = logits(load_gguf_model(path), ids)
    torch.testing.assert_close(got, logits(rounded_like_file(model, out_type), ids), rtol=0, atol=ATOL_ROUNDED)
    ref = logits(model, ids)
    assert (got - ref).abs().max() / ref.abs().max() < REL_BOUND[out_type]


@pytest.mark.parametrize("pre", list(PRE_TOKENIZERS))
def test_tokenizer_and_chat_template(tmp_path, out_dir, pre):
    tokenizer = byte_level_tokenizer(pre)
    folder = save_folder(tmp_path / "tok-model", tiny_model(len(tokenizer)), tokenizer)
    path = export_gguf(folder, out_dir / "m.gguf")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == pre
    assert fields["tokenizer.ggml.add_bos_token"].contents() is (pre == "llama-bpe")

    loaded = load_gguf_tokenizer(path)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )
    chat = dict(add_generation_prompt=True, return_dict=True)
    assert (
        loaded.apply_chat_template(CHAT, **chat)["input_ids"]
        == tokenizer.apply_chat_template(CHAT, **chat)["input_ids"]
    )
    text = "Hello world! 123 + 456 = 579 <think> café\n\n  x"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_metadata(model_dir, out_dir):
    folder, model = model_dir
    fields = gguf.GGUFReader(export_gguf(folder, out_dir / "m.gguf", "bf16")).fields
    config = model.config
    expected = {
        "general.architecture": "llama",
        "general.name": "tiny-llama",
        "general.file_type": int(gguf.LlamaFileType.MOSTLY_BF16),
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": 64,
        "llama.block_count": 2,
        "llama.feed_forward_length": 80,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": config.vocab_size,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    assert {k: fields[k].contents() for k in expected} == expected
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(1e-5)
    tokens, types = fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(types) == config.vocab_size
    assert tokens[-3:] == [f"[PAD{i}]" for i in range(config.vocab_size - 3, config.vocab_size)]
    by_token = dict(zip(tokens, types, strict=True))
    assert (by_token["<|im_start|>"], by_token["<think>"], by_token[tokens[-1]]) == (
        gguf.TokenType.CONTROL,
        gguf.TokenType.USER_DEFINED,
        gguf.TokenType.UNUSED,
    )


@pytest.mark.parametrize("arch", ["llama-tied", "mistral"])
def test_tied_embeddings_and_mistral(tmp_path, tokenizer, out_dir, arch):
    model = tiny_model(
        len(tokenizer),
        arch="mistral" if arch == "mistral" else "llama",
        intermediate_size=96,
        tie_word_embeddings=arch == "llama-tied",
    )
    path = export_gguf(save_folder(tmp_path / f"tiny-{arch}", model, tokenizer), out_dir / "m.gguf", "f16")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert ("output.weight" in names) is (arch == "mistral")
    loaded = load_gguf_model(path)
    assert loaded.config.tie_word_embeddings is (arch == "llama-tied")
    ids = torch.tensor([tokenizer("The capital of France is Paris.")["input_ids"]])
    torch.testing.assert_close(
        logits(loaded, ids), logits(rounded_like_file(model, "f16"), ids), rtol=0, atol=ATOL_ROUNDED
    )


def test_sharded_folder_writes_the_same_file(model_dir, tmp_path, tokenizer):
    folder, model = model_dir
    sharded = save_folder(tmp_path / "sharded" / folder.name, model, tokenizer, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    one, many = export_gguf(folder, tmp_path / "one.gguf"), export_gguf(sharded, tmp_path / "many.gguf")
    assert one.read_bytes() == many.read_bytes()


def test_qk_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    undo = LlamaTensorProcessor()._reverse_permute_weights
    q, k, bias = np.random.randn(4 * 16, 64), np.random.randn(2 * 16, 64), np.random.randn(2 * 16)
    np.testing.assert_array_equal(undo(rotary_halves_to_interleaved(q, 4), 4, 4), q)
    np.testing.assert_array_equal(undo(rotary_halves_to_interleaved(k, 2), 4, 2), k)
    np.testing.assert_array_equal(undo(rotary_halves_to_interleaved(bias, 2), 4, 2), bias)
    # one head of 4 rows [a0, a1, b0, b1] (rotated pairs (a_i, b_i)) becomes [a0, b0, a1, b1]
    np.testing.assert_array_equal(rotary_halves_to_interleaved(np.arange(4), 1), [0, 2, 1, 3])


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = transformers.LlamaConfig(
        hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072, rope_parameters=rope
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    factors = _llama3_rope_factors(config.to_dict())  # llama.cpp divides each frequency by its factor
    torch.testing.assert_close(plain / factors, scaled.float(), rtol=1e-6, atol=0)


def test_errors(model_dir, tmp_path, tokenizer):
    folder, _ = model_dir
    with pytest.raises(FileNotFoundError, match="no-such-folder"):
        export_gguf(tmp_path / "no-such-folder", tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="out_type='q4_0'"):
        export_gguf(folder, tmp_path / "x.gguf", "q4_0")

    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="existing.gguf.*overwrite=True"):
        export_gguf(folder, existing)
    assert existing.read_bytes() == b"keep me"
    export_gguf(folder, existing, overwrite=True)
    assert existing.read_bytes()[:4] == b"GGUF"

    other = tmp_path / "qwen"
    shutil.copytree(folder, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ValueError, match="'Qwen2ForCausalLM'.*supported: LlamaForCausalLM, MistralForCausalLM"):
        export_gguf(other, tmp_path / "x.gguf")
    (other / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        export_gguf(other, tmp_path / "x.gguf")


def test_tokenizer_errors_leave_no_file(model_dir, tmp_path):
    folder, _ = model_dir
    spm = tmp_path / "spm"
    shutil.copytree(folder, spm)
    spec = json.loads((spm / "tokenizer.json").read_text())
    # a sentencepiece-style BPE (Llama 2 / Mistral 7B): Metaspace instead of byte-level
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "▁",
        "prepend_scheme": "first",
        "split": False,
    }
    spec["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    (spm / "tokenizer.json").write_text(json.dumps(spec))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="byte-level BPE"):
        export_gguf(spm, out / "x.gguf")
    assert list(out.iterdir()) == []  # the temporary file is removed

    (spm / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer.json is missing"):
        export_gguf(spm, out / "x.gguf")


@pytest.mark.slow
def test_smollm2_round_trip(tmp_path):
    """The real SmolLM2-135M-Instruct: its GGUF -> HF folder -> our q8_0 GGUF reloads and answers alike.

    The source is the shipped Q4_1 GGUF dequantized to fp32. The reload equals it with its matrices rounded to
    Q8_0 (measured: 0), and that rounding moves the logits by max |delta| 1.3 on logits of max |.| 38 (3.5%;
    bf16 measured 0.7%; 95% of positions keep their top token) without changing the greedy answer. Takes
    ~2-3 min on 2 CPU cores, mostly transformers parsing the 49k-token vocabulary of each GGUF in Python.
    """
    from kbit.models import default_model_path

    src = default_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)
    folder = save_folder(tmp_path / "SmolLM2-135M-Instruct", model.eval(), tokenizer)
    out = tmp_path / "gguf"
    out.mkdir()
    path = export_gguf(folder, out / "smollm2-q8_0.gguf", "q8_0")

    loaded, loaded_tokenizer = load_gguf_model(path), load_gguf_tokenizer(path)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = loaded_tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
        "input_ids"
    ]
    assert (
        ids.tolist()
        == tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ].tolist()
    )
    got = logits(loaded, ids)
    torch.testing.assert_close(got, logits(rounded_like_file(model, "q8_0"), ids), rtol=0, atol=1e-4)
    ref = logits(model, ids)
    assert (got - ref).abs().max() / ref.abs().max() < 0.1
    with torch.no_grad():
        answer = loaded.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1] :]
    assert "Paris" in loaded_tokenizer.decode(answer, skip_special_tokens=True)
