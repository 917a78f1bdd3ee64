"""Datasets for federated fine-tuning: built-in offline corpora, local files, and partitioning into clients."""

from fedtune.data.corpus import Corpus, Task
from fedtune.data.hpo import hpo_definitions, hpo_systems, hpo_text
from fedtune.data.icd10 import icd10_chapters, icd10_instructions
from fedtune.data.local import local_file
from fedtune.data.partition import (
    ClientData,
    client_partition,
    format_summary,
    partition_summary,
    split_test,
    subsample,
)
from fedtune.data.spec import DataSpec

__all__ = [
    "ClientData",
    "Corpus",
    "DataSpec",
    "Task",
    "client_partition",
    "format_summary",
    "hpo_definitions",
    "hpo_systems",
    "hpo_text",
    "icd10_chapters",
    "icd10_instructions",
    "local_file",
    "partition_summary",
    "split_test",
    "subsample",
]
