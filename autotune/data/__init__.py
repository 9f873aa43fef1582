"""Training data: text tokenized once into flat, memory-mapped token files, and the loader.

- :mod:`~autotune.data.tokens`: the token file format (a fixed header, then the ids).
- :mod:`~autotune.data.corpus`: datasets (prepare, the default corpus, open), the tokenizer,
  and the identity of the data a plan's figures were measured on.
- :mod:`~autotune.data.loader`: the batch sources the training loop reads, and validation loss.
"""

from autotune.data.corpus import (
    EOT,
    MAX_VOCAB,
    DataMeta,
    Dataset,
    data_identity,
    default_dataset,
    open_dataset,
    plan_data_identity,
    prepare,
    source_identity,
)
from autotune.data.loader import Batches, BatchSource, RandomBatches, val_batches, val_loss
from autotune.data.tokens import FORMAT_VERSION, HEADER_BYTES, MAGIC, TokenFile, read_tokens, write_tokens

__all__ = [
    "EOT",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_VOCAB",
    "BatchSource",
    "Batches",
    "DataMeta",
    "Dataset",
    "RandomBatches",
    "TokenFile",
    "data_identity",
    "default_dataset",
    "open_dataset",
    "plan_data_identity",
    "prepare",
    "read_tokens",
    "source_identity",
    "val_batches",
    "val_loss",
    "write_tokens",
]
