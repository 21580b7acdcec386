"""The built-in fine-tuning task: rewrite a date written in words as an ISO 8601 date (``YYYY-MM-DD``).

Why this task for the default job (a few minutes of QLoRA on SmolLM2-135M on a 2-core CPU):

- The answer is checkable exactly: there is one right string, ``2021-03-05``, so accuracy needs no judge.
- The base model does it badly: it answers in a sentence, echoes the date or writes DD/MM/YYYY; SmolLM2-135M
  gets 0/40 eval records exactly right, and 39/40 after 60 LoRA steps of batch 8
  (``tests/data/builtin_baseline.py``).
- It is learnable in well under 100 short steps: the skill is copying the year and day (attention does that
  well), padding the day to two digits and a 12-entry month-name-to-number table -- no knowledge the model
  must acquire from scratch, unlike a fictional fact table (which the model can only memorize, not generalize
  to an eval split).
- Examples are short (under 64 tokens with SmolLM2's default system prompt), so a CPU step is cheap, and the
  eval split is disjoint from the training split by construction (every tenth calendar day goes to eval), so
  eval accuracy measures the learned rule, not recall.

Everything is generated from a seed with :class:`random.Random`, so ``builtin_dataset`` returns the same
records on every machine and Python version.
"""

from __future__ import annotations

import datetime as dt
import random

MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip

# Several phrasings of the request and of the date, so the model learns the rule rather than one string.
# Kept terse: with SmolLM2's default system prompt (21 tokens) every example stays under 64 tokens.
INSTRUCTIONS = (
    "Convert to YYYY-MM-DD: {date}",
    "Write {date} as an ISO date.",
    "{date} in ISO 8601 format?",
)
FIRST_YEAR, LAST_YEAR = 1950, 2049
EVAL_EVERY = 10  # days whose ordinal is a multiple of this belong to the eval split only


def _ordinal_suffix(day: int) -> str:
    if 11 <= day % 100 <= 13:
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")


def spell_date(date: dt.date, style: int) -> str:
    """Write ``date`` in words in one of four styles (0: 'March 5, 2021', 1: '5 March 2021', 2: 'Mar 5, 2021',
    3: '5th March 2021')."""
    month = MONTHS[date.month - 1]
    if style == 0:
        return f"{month} {date.day}, {date.year}"
    if style == 1:
        return f"{date.day} {month} {date.year}"
    if style == 2:
        return f"{month[:3]} {date.day}, {date.year}"
    return f"{date.day}{_ordinal_suffix(date.day)} {month} {date.year}"


def _in_split(date: dt.date, split: str) -> bool:
    is_eval = date.toordinal() % EVAL_EVERY == 0
    return is_eval if split == "eval" else not is_eval


def builtin_dataset(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """``n`` chat records (``{"messages": [user, assistant]}``) of the date-to-ISO task for ``split``."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if n is None:
        n = 800 if split == "train" else 100
    first, last = dt.date(FIRST_YEAR, 1, 1).toordinal(), dt.date(LAST_YEAR, 12, 31).toordinal()
    n_eval_days = last // EVAL_EVERY - (first - 1) // EVAL_EVERY
    available = n_eval_days if split == "eval" else last - first + 1 - n_eval_days
    if not 0 <= n <= available:
        raise ValueError(f"n must be between 0 and {available} for split {split!r}, got {n}")
    # A string seed is hashed the same way on every platform; the split name keeps the two streams apart.
    rng = random.Random(f"kbit-builtin:{seed}:{split}")
    records: list[dict] = []
    seen: set[dt.date] = set()
    while len(records) < n:
        date = dt.date.fromordinal(rng.randint(first, last))
        if date in seen or not _in_split(date, split):
            continue
        seen.add(date)
        question = rng.choice(INSTRUCTIONS).format(date=spell_date(date, rng.randrange(4)))
        records.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": date.isoformat()},
                ]
            }
        )
    return records


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def check_answer(record: dict, generated_text: str) -> bool:
    """True when ``generated_text`` equals the record's last assistant answer, up to whitespace and case."""
    expected = next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")
    return _normalize(generated_text) == _normalize(expected)
