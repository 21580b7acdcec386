"""Peak host memory of kbit's streaming 4-bit loader against the size of the 16-bit checkpoint.

    python bench/load_memory.py --work /tmp/kbit-load-bench

Writes two bf16 safetensors folders: SmolLM2-135M-Instruct (converted from the embedded GGUF) and a randomly
initialised Llama-shaped model of about 1.1B parameters (written tensor by tensor, never held whole), then loads each
with ``kbit.load_model(..., bits=4)`` in a fresh process and reports its peak RSS (ru_maxrss) above the Python +
torch + transformers baseline, next to the checkpoint size and the size of the quantized model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ONE_B = dict(
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def write_random_llama(folder: Path, shard_bytes: int = 512 * 2**20) -> int:
    """Write a random bf16 Llama checkpoint tensor by tensor, in shards; returns the parameter count."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**ONE_B)
    cfg.save_pretrained(folder)
    h, m, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * (cfg.hidden_size // 32)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (m, h), p + "mlp.up_proj.weight": (m, h),
                   p + "mlp.down_proj.weight": (h, m), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}  # fmt: skip
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (cfg.vocab_size, h)}
    g = torch.Generator().manual_seed(0)
    weight_map, shard, size, n_shard, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, n_shard
        name = f"model-{n_shard:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size, n_shard = {}, 0, n_shard + 1

    for key, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        shard[key] = t.to(torch.bfloat16)
        size, total = size + shard[key].numel() * 2, total + shard[key].numel()
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    index = {"metadata": {"total_size": total * 2}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_smollm2(folder: Path) -> None:
    """The embedded GGUF model as a bf16 safetensors folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kbit.models import default_model_path

    p = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.bfloat16)
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name).save_pretrained(folder)


# ru_maxrss survives exec (Linux carries the parent's high-water mark into the child), so read the process's own
# VmHWM, and reset it after the imports (clear_refs 5) so the peak covers loading alone.
MEASURE = r"""
import sys, time, json, torch, transformers, transformers.models.llama.modeling_llama
from kbit.models import load_model
from kbit.nn import Linear4bit
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
t = time.perf_counter()
m = load_model(sys.argv[1], bits=4, device="cpu")
dt = time.perf_counter() - t
peak = status("VmHWM:")
size = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers())) / 2**20
print(json.dumps(dict(baseline_mib=base, peak_mib=peak, model_mib=size, seconds=dt,
                      n4=sum(isinstance(x, Linear4bit) for x in m.modules()))))
"""


def measure(folder: Path) -> dict:
    """Load ``folder`` in a fresh process and return its memory figures."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["checkpoint_mib"] = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    return res


def main() -> None:
    """Write both checkpoints (unless present) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("/tmp/kbit-load-bench"))
    args = ap.parse_args()
    rows = []
    for name, writer in (("SmolLM2-135M-Instruct", write_smollm2), ("random Llama 1.1B", write_random_llama)):
        folder = args.work / name.split()[-1]
        if not (folder / "config.json").is_file():
            t = time.perf_counter()
            writer(folder)
            print(f"wrote {folder} in {time.perf_counter() - t:.0f} s", flush=True)
        r = measure(folder)
        rows.append((name, r))
        print(name, r, flush=True)
    print(
        "\n| model | bf16 checkpoint | 4-bit model in memory | peak RSS above baseline | ratio to checkpoint "
        "| load time |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        extra = r["peak_mib"] - r["baseline_mib"]
        print(
            f"| {name} | {r['checkpoint_mib']:.0f} MiB | {r['model_mib']:.0f} MiB | {extra:.0f} MiB | "
            f"{extra / r['checkpoint_mib']:.2f} | {r['seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()
