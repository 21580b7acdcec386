"""``kbit generate`` (one prompt, or a JSONL file of prompts) and ``kbit chat`` (interactive)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_model_options, load_for_inference


def add_parser(sub) -> None:
    """Register generate and chat."""
    g = sub.add_parser("generate", help="answer one prompt, or every prompt of a JSONL file, with a model + adapter")
    add_model_options(g)
    g.add_argument("--prompt", help="the prompt (one user turn)")
    g.add_argument("--prompts", type=Path, help='JSONL file, one {"prompt": ...} or {"messages": [...]} per line')
    g.add_argument("--out", type=Path, help="where --prompts answers go (JSONL); default: standard output")
    g.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=16,
                   help="--prompts decoded this many at a time (default 16)")  # fmt: skip
    _sampling(g)
    g.set_defaults(func=_generate)
    c = sub.add_parser("chat", help="chat with a model + adapter in the terminal (/reset clears, /exit quits)")
    add_model_options(c)
    _sampling(c)
    c.add_argument("--system", default=None, help="system message")
    c.set_defaults(func=_chat)


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


def read_prompts(path: Path) -> list[dict]:
    """Records of a prompts JSONL file; errors name file:line."""
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
        records.append(rec)
    if not records:
        raise ValueError(f"{path} has no prompts; write one JSON object per line")
    return records


def _generate(args) -> int:
    from ..generate import generate, generate_batch

    if (args.prompt is None) == (args.prompts is None):
        print("error: pass exactly one of --prompt or --prompts", file=sys.stderr)
        return 2
    records = read_prompts(args.prompts) if args.prompts else None
    model, tok = load_for_inference(args)
    if records is None:
        print(generate(model, tok, args.prompt, **_sample_kw(args)))
        return 0
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout
    try:
        for lo in range(0, len(records), args.batch_size):
            chunk = records[lo : lo + args.batch_size]
            prompts = [rec.get("messages") or rec["prompt"] for rec in chunk]
            answers = generate_batch(model, tok, prompts, batch_size=args.batch_size, **_sample_kw(args))
            for rec, answer in zip(chunk, answers, strict=True):
                out.write(json.dumps(rec | {"answer": answer}, ensure_ascii=False) + "\n")
            out.flush()  # answers already written survive an interruption
            if args.out:
                print(f"\r{lo + len(chunk)}/{len(records)} prompts answered", end="", file=sys.stderr, flush=True)
    finally:
        if args.out:
            out.close()
            print(file=sys.stderr)
    return 0


def _chat(args) -> int:
    from ..generate import generate

    model, tok = load_for_inference(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    print("kbit chat: type a message; /reset clears the conversation, /exit (or Ctrl-D) quits.", flush=True)
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
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = generate(model, tok, system + history, **_sample_kw(args))
        history.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
