"""Model and config builders shared by the distributed tests and their torchrun worker (not a conftest: the
worker imports it too)."""

from __future__ import annotations

import resource

import torch

SEQ_VOCAB = 96  # the tiny model's vocabulary (train_testing.VOCAB)


def build_model(folder, dtype: torch.dtype = torch.float32, seed: int = 0, quant_storage: torch.dtype | None = None):
    """The tiny Llama through kbit.load_model (streamed, NF4 + double quant) with LoRA r=4 whose B is non-zero."""
    from kbit.lora import add_lora
    from kbit.models.load import load_model

    model = load_model(folder, compute_dtype=dtype, quant_storage=quant_storage or dtype, device="cpu")
    torch.manual_seed(seed)
    add_lora(model, r=4, alpha=8, dropout=0.0, dtype=torch.float32)
    with torch.no_grad():  # B starts at zero; give it values so that every LoRA weight gets a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def build_sharded(folder, ctx, dtype: torch.dtype = torch.float32, seed: int = 0):
    """(build_model's model loaded straight into FSDP shards by kbit.dist.load_sharded, its LoadMemory).

    The same values as ``shard_model(build_model(...))``: LoRA A drawn in the same order from the same seed, and B
    drawn whole, in the same order, each rank keeping its rows (FSDP shards dim 0 in ``world_size`` even chunks).
    """
    from kbit.dist import load_sharded, local_tensor
    from kbit.lora.inject import LoraSettings

    torch.manual_seed(seed)
    model, memory = load_sharded(folder, ctx, LoraSettings(r=4, alpha=8, dropout=0.0), compute_dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                whole = torch.empty(p.shape).normal_(0, 0.02)
                local_tensor(p).copy_(whole.chunk(ctx.world_size)[ctx.rank])
    return model, memory


def run_config(folder, strategy: str, **overrides) -> dict:
    """4 steps of 2 micro-batches (per-rank batch 2), checkpoint only at the end, fp32 on the CPU."""
    config = dict(
        output_dir=str(folder / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_steps=1,
        logging_steps=1,
        save_steps=0,
        eval_on_start=False,
        report_to="none",
        strategy=strategy,
        bf16=False,
    )
    config.update(overrides)
    return config


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def char_tokenizer():
    """A character-level fast tokenizer whose ids fit the tiny model's 96-token vocabulary."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + list(string.ascii_letters + string.digits + " .,:-?!'"))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_llama(folder) -> None:
    """A random 2-layer Llama (hidden 64, vocab 96) with the character tokenizer, as kbit.load_model reads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=SEQ_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
