"""``kbit generate`` (one prompt, or a JSONL file of prompts) and ``kbit chat`` (interactive)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_options, load_for_inference

BASE = "base"  # kbit.lora.adapters.BASE, the adapter name that means none (kept here so --help imports no torch)
DEFAULT = "default"  # the name of an adapter given as a bare folder


def add_parser(sub) -> None:
    """Register generate and chat."""
    g = sub.add_parser("generate", help="answer one prompt, or every prompt of a JSONL file, with a model + adapter")
    add_model_options(g, adapter=False)
    _adapter_option(g)
    g.add_argument("--prompt", help="the prompt (one user turn)")
    g.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ...} or {"messages": [...]} per line, '
                   'optionally with "adapter": NAME (one of --adapter NAME=DIR, or "base" for none)')  # fmt: skip
    g.add_argument("--out", type=Path, help="where --prompts answers go (JSONL); default: standard output")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="--prompts decoded this many at a time (default 16)")  # fmt: skip
    _sampling(g)
    g.set_defaults(func=_generate)
    c = sub.add_parser(
        "chat", help="chat with a model + adapter in the terminal (/reset clears, /adapter NAME switches, /exit quits)"
    )
    add_model_options(c, adapter=False)
    _adapter_option(c)
    _sampling(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=_chat)


def _adapter_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", action="append", default=None, metavar="[NAME=]DIR",
                   help="LoRA adapter folder (PEFT format) applied unmerged; repeat as NAME=DIR to load several "
                   "(the first is active)")  # fmt: skip


def adapter_specs(values: list[str] | None) -> list[tuple[str, Path]]:
    """(name, folder) per --adapter value: NAME=DIR, or a bare DIR named "default"; one-line errors for clashes."""
    specs: list[tuple[str, Path]] = []
    for value in values or []:
        name, sep, folder = value.partition("=")
        if not sep or Path(value).exists() or "/" in name or "\\" in name:
            name, folder = DEFAULT, value  # a folder (which may itself contain "=")
        if not name or not folder:
            raise ValueError(f"--adapter {value!r}: write NAME=DIR or a folder")
        if name == BASE:
            raise ValueError(f"--adapter {value!r}: {BASE!r} means no adapter; pick another name")
        if name in (n for n, _ in specs):
            raise ValueError(f"--adapter: the name {name!r} is given twice; name each folder: --adapter NAME=DIR")
        specs.append((name, Path(folder)))
    return specs


def _load(args: argparse.Namespace, specs: list[tuple[str, Path]]):
    """(model, tokenizer) with every --adapter loaded under its name; the first one is active."""
    from ..export import load_adapter

    model, tok = load_for_inference(argparse.Namespace(**{**vars(args), "adapter": None}))
    for name, folder in specs:
        load_adapter(model, folder, dtype=model.kbit_load_config.compute_dtype, name=name)
    return model.eval(), tok


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    p.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--engine", default="auto", choices=("auto", "static", "transformers"),
                   help="static: kbit's static-cache decoder (CUDA graphs, fused 4-bit GEMV); auto: static where the "
                   "model family allows it")  # fmt: skip
    p.add_argument("--truncate", action="store_true", help="keep the end of a prompt too long for the context")


def _sample_kw(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop,
        seed=args.seed,
        engine=args.engine,
        truncate=args.truncate,
    )


def read_prompts(path: Path, adapters: list[str] | None = None) -> list[dict]:
    """Records of a prompts JSONL file; errors name file:line. A record's "adapter" must be one of ``adapters``
    or "base"."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompts file")
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not ("prompt" in rec or "messages" in rec):
            raise ValueError(f'{path}:{i}: each line needs a "prompt" string or a "messages" list')
        name = rec.get("adapter")
        if name is not None and name != BASE and name not in (adapters or []):
            loaded = f"loaded: {', '.join(adapters)} (or {BASE!r} for none)" if adapters else "no --adapter was given"
            raise ValueError(f"{path}:{i}: adapter {name!r} is not loaded; {loaded}")
        records.append(rec)
    if not records:
        raise ValueError(f"{path} has no prompts; write one JSON object per line")
    return records


def _generate(args) -> int:
    from ..generate import generate

    if (args.prompt is None) == (args.prompts is None):
        print("error: pass exactly one of --prompt or --prompts", file=sys.stderr)
        return 2
    specs = adapter_specs(args.adapter)
    records = read_prompts(args.prompts, [name for name, _ in specs]) if args.prompts else None
    model, tok = _load(args, specs)
    if records is None:
        print(generate(model, tok, args.prompt, **_sample_kw(args)))
        return 0
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        _answer_file(model, tok, records, args, out)
    finally:
        if args.out:
            out.close()
            print(file=sys.stderr)
    return 0


def _answer_file(model, tok, records: list[dict], args, out) -> None:
    """Answer ``records`` one adapter at a time (each group decoded in batches with that adapter active) and write
    them in input order as soon as every earlier record is answered, so an interruption keeps an answered prefix."""
    from ..generate import generate_batch
    from ..lora import active_adapter, set_adapter

    first = active_adapter(model) or BASE
    groups: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        groups.setdefault(rec.get("adapter") or first, []).append(i)
    answers: dict[int, str] = {}  # answered, not yet written
    written = answered = 0
    for name, indices in groups.items():
        set_adapter(model, name)  # for the whole group: a captured decoder is switched once, not per batch
        for lo in range(0, len(indices), args.batch_size):
            chunk = indices[lo : lo + args.batch_size]
            prompts = [records[i].get("messages") or records[i]["prompt"] for i in chunk]
            got = generate_batch(model, tok, prompts, batch_size=args.batch_size, **_sample_kw(args))
            answers.update(zip(chunk, got, strict=True))
            while written in answers:
                out.write(json.dumps(records[written] | {"answer": answers.pop(written)}, ensure_ascii=False) + "\n")
                written += 1
            out.flush()  # answers already written survive an interruption
            answered += len(chunk)
            if args.out:
                print(f"\r{answered}/{len(records)} prompts answered", end="", file=sys.stderr, flush=True)


def _chat(args) -> int:
    from ..generate import generate

    model, tok = _load(args, adapter_specs(args.adapter))
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("kbit chat: type a message; /reset clears the conversation, /adapter NAME switches adapters (/adapter lists "
          "them), /exit (or Ctrl-D) quits.", flush=True)  # fmt: skip
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history = []
            continue
        if line.split(maxsplit=1)[:1] == ["/adapter"]:
            _switch(model, line.split(maxsplit=1)[1:])
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = generate(model, tok, system + history, **_sample_kw(args))
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)


def _switch(model, name: list[str]) -> None:
    """Chat's /adapter: with a name, answer with that adapter from now on ("base": none); without, list them."""
    from ..lora import active_adapter, list_adapters, set_adapter

    if name:
        try:
            set_adapter(model, name[0].strip())
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return
    active = active_adapter(model) or BASE
    names = [f"*{n}" if n == active else n for n in [*list_adapters(model), BASE]]
    print(f"adapter: {active} (loaded: {', '.join(names)})", flush=True)
