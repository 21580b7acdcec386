"""kbit.data: read instruction data, render it with a chat template, mask the loss, pack and collate it.

Data flows load_dataset -> (split_records) -> tokenize_records -> (pack_examples) -> collate; prepare_data
does it in one call. Bad data raises DataError (a ValueError) whose one-line message names file:line and the
field.
"""

from .builtin import builtin_dataset, check_answer
from .collate import Batch, block_causal_mask, collate, iterate_batches
from .encode import IGNORE_INDEX, Example, TokenizedData, encode_chat, encode_text, tokenize_records
from .errors import DataError
from .formats import FORMATS, detect_format
from .load import Records, load_dataset, split_records
from .packing import pack_examples, pack_indices
from .prepare import prepare_data

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "Batch",
    "DataError",
    "Example",
    "Records",
    "TokenizedData",
    "block_causal_mask",
    "builtin_dataset",
    "check_answer",
    "collate",
    "detect_format",
    "encode_chat",
    "encode_text",
    "iterate_batches",
    "load_dataset",
    "pack_examples",
    "pack_indices",
    "prepare_data",
    "split_records",
    "tokenize_records",
]
