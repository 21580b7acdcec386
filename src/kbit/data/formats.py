"""Record formats: detect which one a record is in and normalize it to chat ``messages`` or plain ``text``.

After normalization there are only two shapes, so the tokenizer step has two cases:

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: rendered with the chat template, loss on assistant
  turns;
- ``{"text": ...}``: tokenized as is, loss on every token.

``prompt``/``completion``, ``question``/``answer`` and alpaca ``instruction``/``input``/``output`` records
become one user message and one assistant message.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import SKIP_HINT, DataError

# Format name -> the fields that identify it, in detection priority order.
FORMATS: dict[str, tuple[str, ...]] = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "question_answer": ("question", "answer"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
# The field holding what the model learns to produce (named in "nothing left to train on" errors).
TARGET_FIELD = {
    "messages": "messages (assistant turns)",
    "prompt_completion": "completion",
    "question_answer": "answer",
    "alpaca": "output",
    "text": "text",
}
SHAPES = "messages; prompt+completion; question+answer; instruction+output (alpaca); text"


def check_format_name(format: str) -> None:
    """Raise ValueError unless ``format`` is 'auto' or a known format name."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; use 'auto' or one of {', '.join(FORMATS)}")


def matching_format(record: dict) -> str | None:
    """The first format whose identifying fields are all present in ``record``, or None."""
    return next((name for name, fields in FORMATS.items() if all(f in record for f in fields)), None)


def detect_format(located: list[tuple[str, dict]]) -> str:
    """The format of the first record whose fields identify one (earlier records are then reported as bad)."""
    for _, record in located:
        name = matching_format(record)
        if name is not None:
            return name
    where, record = located[0]
    raise DataError(
        f"{where}: cannot tell the data format from the fields {sorted(record)}; "
        f"records need one of: {SHAPES} (or name the format with format=...)"
    )


def normalize_record(record: dict, format: str, where: str) -> dict:
    """``record`` as ``{"messages": [...]}`` or ``{"text": str}``; a DataError names any bad field."""
    if format == "text":
        return {"text": _string(record, "text", format, where)}
    if format == "messages":
        return {"messages": _messages(record, "messages", format, where)}
    if format == "prompt_completion" and isinstance(record.get("prompt"), list):
        # TRL's conversational prompt/completion: both fields are message lists.
        prompt = _messages(record, "prompt", format, where, need_assistant=False)
        completion = record.get("completion")
        if isinstance(completion, list):
            completion = _messages(record, "completion", format, where)
        else:
            completion = [{"role": "assistant", "content": _string(record, "completion", format, where)}]
        return {"messages": prompt + completion}
    if format == "alpaca":
        user = _string(record, "instruction", format, where)
        extra = record.get("input")
        if extra is not None and not (isinstance(extra, str) and not extra.strip()):  # blank input is common
            user = f"{user}\n\n{_string(record, 'input', format, where)}"
        answer = _string(record, "output", format, where)
    else:
        question_field, answer_field = FORMATS[format]
        user = _string(record, question_field, format, where)
        answer = _string(record, answer_field, format, where)
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def _fail(where: str, field: str, problem: str, format: str) -> DataError:
    needs = " and ".join(f"'{f}'" for f in FORMATS[format])
    return DataError(
        f"{where}: field '{field}' {problem} (format '{format}' needs {needs}); fix the record, {SKIP_HINT}"
    )


def _string(record: dict, field: str, format: str, where: str) -> str:
    if field not in record:
        raise _fail(where, field, "is missing", format)
    value = record[field]
    # Numbers are fine as answers (JSON {"answer": 42}); CSV gives everything as strings already.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(where, field, f"must be a non-empty string, got {_show(value)}", format)
    return value


def _messages(record: dict, field: str, format: str, where: str, need_assistant: bool = True) -> list[dict]:
    if field not in record:
        raise _fail(where, field, "is missing", format)
    value = record[field]
    if isinstance(value, str):  # CSV cells hold the message list as JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _fail(where, field, f"is text but not a JSON message list ({e.msg})", format) from None
    if not isinstance(value, list) or not value:
        raise _fail(
            where,
            field,
            f"must be a non-empty list of {{role, content}} messages, got {_show(value)}",
            format,
        )
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _fail(where, f"{field}[{i}].role", f"must be a string, in {_show(message)}", format)
        if not isinstance(message.get("content"), str):
            raise _fail(
                where,
                f"{field}[{i}].content",
                f"must be a string, got {_show(message.get('content'))}",
                format,
            )
        messages.append({"role": message["role"], "content": message["content"]})
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise _fail(where, field, "has no assistant message, so nothing to train on", format)
    return messages


def _show(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
