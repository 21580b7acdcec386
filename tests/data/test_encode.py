"""Chat rendering and loss masks on SmolLM2's real chat template; text records; truncation and drop counts."""

from __future__ import annotations

import pytest

from kbit.data import IGNORE_INDEX, DataError, encode_chat, encode_text, load_dataset, tokenize_records

END = "<|im_end|>"  # SmolLM2's end-of-turn token (its EOS)


def supervised_spans(tokenizer, example) -> list[str]:
    """Decode each run of consecutive supervised tokens."""
    spans, current = [], []
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token, "labels are the input ids where supervised"
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def chat(*turns: str) -> list[dict]:
    roles = ["user", "assistant"]
    return [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]


def test_single_turn_supervises_exactly_the_answer_and_end_of_turn(tokenizer):
    example = encode_chat(chat("What is 2+2?", "It is 4."), tokenizer)
    assert supervised_spans(tokenizer, example) == [f"It is 4.{END}"]
    # The full rendering is the chat template's, token for token.
    rendered = tokenizer.apply_chat_template(chat("What is 2+2?", "It is 4."), tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert example.labels[0] == IGNORE_INDEX


def test_multi_turn_supervises_every_assistant_turn(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *chat("Hi", "Hello there", "Bye", "See you")]
    example = encode_chat(messages, tokenizer)
    assert supervised_spans(tokenizer, example) == [f"Hello there{END}", f"See you{END}"]
    assert example.num_targets == sum(
        len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (f"Hello there{END}", f"See you{END}")
    )


def test_trailing_user_turn_is_not_supervised(tokenizer):
    example = encode_chat(chat("Hi", "Hello", "And?"), tokenizer)
    assert supervised_spans(tokenizer, example) == [f"Hello{END}"]


def test_flat_formats_become_one_supervised_answer(tokenizer):
    data = tokenize_records([{"prompt": "Capital of France?", "completion": "Paris"}], tokenizer, max_seq_len=128)
    assert supervised_spans(tokenizer, data.examples[0]) == [f"Paris{END}"]
    qa = tokenize_records([{"question": "Capital of France?", "answer": "Paris"}], tokenizer, max_seq_len=128)
    assert qa.examples == data.examples
    alpaca = tokenize_records([{"instruction": "Add the numbers.", "input": "2 3", "output": "5"}], tokenizer, 128)
    assert supervised_spans(tokenizer, alpaca.examples[0]) == [f"5{END}"]
    assert "Add the numbers.\n\n2 3" in tokenizer.decode(alpaca.examples[0].input_ids)


def test_train_on_prompt_supervises_all_but_the_first_token(tokenizer):
    example = encode_chat(chat("Hi", "Hello"), tokenizer, train_on_prompt=True)
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]


def test_text_records_train_on_every_token_and_end_with_eos(tokenizer):
    example = encode_text("The quick brown fox.", tokenizer)
    assert example.input_ids == tokenizer("The quick brown fox.")["input_ids"] + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE_INDEX] + example.input_ids[1:]
    data = tokenize_records([{"text": "The quick brown fox."}], tokenizer, max_seq_len=64)
    assert data.examples[0] == example


def test_truncation_and_drop_counts(tokenizer):
    short = {"prompt": "Hi", "completion": "Hello"}
    long_answer = {"prompt": "Hi", "completion": "word " * 40}
    long_prompt = {"prompt": "word " * 40, "completion": "Hello"}
    lengths = [len(encode_chat(load_dataset([r]).rows[0]["messages"], tokenizer).input_ids)
               for r in (short, long_answer, long_prompt)]  # fmt: skip
    max_seq_len = lengths[0] + 5
    assert lengths[1] > max_seq_len and lengths[2] > max_seq_len
    data = tokenize_records([short, long_answer, long_prompt, short], tokenizer, max_seq_len)
    # long_answer keeps its first answer tokens (truncated); long_prompt's answer is past the limit (dropped).
    assert (len(data.examples), data.truncated, data.dropped, data.skipped) == (3, 1, 1, 0)
    assert [len(e.input_ids) for e in data.examples] == [lengths[0], max_seq_len, lengths[0]]
    prompt_length = data.examples[0].labels.index(tokenizer.convert_tokens_to_ids("Hello"))
    assert data.examples[1].num_targets == max_seq_len - prompt_length  # the same prompt as `short`
    assert data.summary().startswith(f"3 sequences, {2 * lengths[0] + max_seq_len} tokens (")
    assert "1 truncated to" in data.summary() and "1 dropped" in data.summary()


def test_skipped_count_travels_to_tokenized_data(tokenizer):
    records = load_dataset([{"prompt": "a", "completion": "b"}, {"prompt": "c"}], skip_bad_records=True)
    assert tokenize_records(records, tokenizer, 64).skipped == 1


class TemplateOverride:
    """SmolLM2's tokenizer with another chat template (duck-typed: the encoder needs only these)."""

    def __init__(self, tokenizer, template):
        self.tokenizer, self.chat_template = tokenizer, template
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, **kwargs)


def test_template_that_is_not_prefix_stable_is_reported(tokenizer):
    # Renders the message count first, so a conversation's prefix renders differently from its start.
    template = (
        "{{ messages|length }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{% endfor %}"
    )
    with pytest.raises(DataError, match=r"^records\[0\]: field 'messages': the chat template renders the first 1 "):
        tokenize_records([{"prompt": "Hi", "completion": "Yo"}], TemplateOverride(tokenizer, template), 64)
    # train_on_prompt needs no prefix, so it works with any template.
    data = tokenize_records([{"prompt": "Hi", "completion": "Yo"}], TemplateOverride(tokenizer, template), 64,
                            train_on_prompt=True)  # fmt: skip
    assert data.examples[0].num_targets == len(data.examples[0].input_ids) - 1


def test_template_errors_name_the_record(tokenizer):
    template = "{{ raise_exception('Conversation roles must alternate') }}"
    with pytest.raises(DataError, match=r"^records\[0\]: field 'messages': the chat template rejects .* alternate"):
        tokenize_records([{"prompt": "Hi", "completion": "Yo"}], TemplateOverride(tokenizer, template), 64)


def test_chat_records_need_a_chat_template(tokenizer):
    with pytest.raises(DataError, match="need a tokenizer with a chat template"):
        tokenize_records([{"prompt": "Hi", "completion": "Yo"}], TemplateOverride(tokenizer, None), 64)
