"""Datasets: formats, validation, chat templates with label masks, packing; governance and preparation in prepare."""

from loraforge.data.formats import FORMATS, Example, LoadResult, Message, Problem, load_dataset
from loraforge.data.packing import PackedBatch, PackedRow, collate_rows, pack_examples
from loraforge.data.templates import IGNORE_INDEX, TokenizedExample, tokenize_example
from loraforge.data.validate import DataReport, check_dataset, suggest_epochs

__all__ = [
    "FORMATS",
    "IGNORE_INDEX",
    "DataReport",
    "Example",
    "LoadResult",
    "Message",
    "PackedBatch",
    "PackedRow",
    "Problem",
    "TokenizedExample",
    "check_dataset",
    "collate_rows",
    "load_dataset",
    "pack_examples",
    "suggest_epochs",
    "tokenize_example",
]
