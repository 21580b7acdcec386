"""Tokenize normalized records: render chats with the tokenizer's chat template, mask the loss to answers.

Why not TRL's ``assistant_only_loss``: it needs ``{% generation %}`` markers in the chat template, which most
templates (SmolLM2's included) lack. Instead, for each assistant turn ``i`` we render the conversation before
it with ``add_generation_prompt=True`` (where the answer starts) and the conversation through it (where the
turn ends), and check that both token sequences are prefixes of the whole conversation's tokens; the tokens in
between are the supervised span. Any template whose rendering of a conversation starts with the rendering of
its first turns works, with or without markers; one that rewrites earlier turns (e.g. strips past reasoning)
is reported, not mis-masked.

Labels are the input ids (transformers shifts them inside the model) with ``-100`` where no loss is taken. The
first token of every example is always ``-100``: nothing precedes it, so unpacked it is never predicted, and
packed it must not be predicted from the previous example's last token. ``labels != -100`` therefore counts
exactly the tokens that contribute to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import DataError
from .formats import TARGET_FIELD
from .load import Records, load_dataset

IGNORE_INDEX = -100


@dataclass
class Example:
    """One training sequence; ``position_ids`` is set only when packed (it restarts at each example)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None

    @property
    def num_targets(self) -> int:
        """Tokens that contribute to the loss."""
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass
class TokenizedData:
    """Tokenized examples and what happened on the way: records truncated, dropped and (at load) skipped."""

    examples: list[Example] = field(repr=False)
    max_seq_len: int
    truncated: int = 0  # kept, but cut to max_seq_len
    dropped: int = 0  # no supervised token left within max_seq_len
    skipped: int = 0  # bad records skipped at load time (skip_bad_records=True)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    @property
    def num_target_tokens(self) -> int:
        return sum(e.num_targets for e in self.examples)

    def summary(self) -> str:
        """One line for the training log."""
        return (
            f"{len(self.examples)} sequences, {self.num_tokens} tokens "
            f"({self.num_target_tokens} supervised); "
            f"{self.truncated} truncated to {self.max_seq_len} tokens, {self.dropped} dropped "
            f"(no supervised token within max_seq_len), {self.skipped} bad records skipped"
        )


def tokenize_records(
    records: Records | list[dict], tokenizer: Any, max_seq_len: int, *, train_on_prompt: bool = False
) -> TokenizedData:
    """Tokenize every record, truncate to ``max_seq_len`` and drop records with no supervised token left."""
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if not isinstance(records, Records):
        records = load_dataset(records)
    if "messages" in records.rows[0] and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{records.source}: chat records need a tokenizer with a chat template, and this one has none; "
            "set tokenizer.chat_template, or give plain 'text' records"
        )
    examples: list[Example] = []
    truncated = 0
    first_dropped: tuple[str, int] | None = None
    for row, where in zip(records.rows, records.where, strict=True):
        if "messages" in row:
            example = encode_chat(row["messages"], tokenizer, train_on_prompt=train_on_prompt, where=where)
        else:
            example = encode_text(row["text"], tokenizer)
        length = len(example.input_ids)
        if length > max_seq_len:
            example = Example(example.input_ids[:max_seq_len], example.labels[:max_seq_len])
        if example.num_targets == 0:
            first_dropped = first_dropped or (where, length)
            continue
        truncated += length > max_seq_len
        examples.append(example)
    if not examples:
        where, length = first_dropped
        raise DataError(
            f"{records.source}: all {len(records)} records have no '{TARGET_FIELD[records.format]}' token "
            f"within max_seq_len={max_seq_len} (first: {where}, {length} tokens); "
            "raise max_seq_len or shorten the records"
        )
    return TokenizedData(
        examples, max_seq_len, truncated, dropped=len(records) - len(examples), skipped=records.skipped
    )


def encode_text(text: str, tokenizer: Any) -> Example:
    """Plain text: the tokenizer's special tokens plus a closing EOS, loss on every token but the first."""
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # so packed documents end, and generation learns to stop
    return Example(ids, [IGNORE_INDEX] + ids[1:])


def encode_chat(messages: list[dict], tokenizer: Any, *, train_on_prompt: bool = False, where: str = "") -> Example:
    """Render ``messages`` with the chat template; labels cover assistant turns (or every token with
    ``train_on_prompt``), each turn ending at its end-of-turn (EOS) token."""
    ids = _tokenize(tokenizer, _render(tokenizer, messages, False, where))
    if train_on_prompt:
        return Example(ids, [IGNORE_INDEX] + ids[1:])
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _prefix_length(tokenizer, messages[:i], True, ids, where)
        end = len(ids) if i == len(messages) - 1 else _prefix_length(tokenizer, messages[: i + 1], False, ids, where)
        end = _after_end_of_turn(ids, start, end, tokenizer.eos_token_id)
        labels[start:end] = ids[start:end]
    labels[0] = IGNORE_INDEX
    return Example(ids, labels)


def _render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # Templates raise jinja2's TemplateError (or anything else) for, e.g., role orders they do not support.
    except Exception as e:
        raise DataError(
            f"{where}: field 'messages': the chat template rejects this conversation ({e}); "
            "fix the roles or their order"
        ) from None


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    # The template already wrote the special tokens (BOS and all); adding them again would double BOS.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_length(tokenizer: Any, prefix: list[dict], add_generation_prompt: bool, ids: list[int], where: str) -> int:
    """Token count of the rendered ``prefix``, checked to be a prefix of the whole conversation's ``ids``."""
    prefix_ids = _tokenize(tokenizer, _render(tokenizer, prefix, add_generation_prompt, where))
    if ids[: len(prefix_ids)] != prefix_ids:
        raise DataError(
            f"{where}: field 'messages': the chat template renders the first {len(prefix)} messages "
            "differently from the start of the whole conversation, so its assistant tokens cannot be found; "
            "pass train_on_prompt=True or use a template that renders conversations turn by turn"
        )
    return len(prefix_ids)


def _after_end_of_turn(ids: list[int], start: int, end: int, eos: int | None) -> int:
    """Cut the span just after its last EOS: ChatML's newline after <|im_end|> is formatting, not answer."""
    if eos is not None:
        for k in range(end - 1, start - 1, -1):
            if ids[k] == eos:
                return k + 1
    return end
