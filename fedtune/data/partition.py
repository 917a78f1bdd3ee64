"""Carve a corpus into a central test set and per-client train/validation splits.

The split into clients is done by a flwr-datasets ``Partitioner`` built from the config, e.g.

- ``IidPartitioner(num_partitions)``: equal contiguous slices of the (shuffled) pool.
- ``DirichletPartitioner(num_partitions, partition_by="label", alpha, seed)``: label skew; small
  ``alpha`` gives each client few labels, large ``alpha`` approaches IID.
- ``ShardPartitioner(num_partitions, partition_by="label", num_shards_per_partition)``: sorts by label,
  cuts equal shards and deals a few to each client (pathological skew; rows past the last whole shard
  may be dropped).
- ``NaturalIdPartitioner(partition_by="hospital")``: one partition per unique value of a column (an
  organisation id kept by ``local_file``); partition ``i`` is the ``i``-th value in sorted order and the
  number of partitions is the number of unique values, so it must equal the number of clients.

Partitioners that need the whole assignment (Dirichlet, shard, natural id) compute it on the first
``load_partition`` and keep it, so reuse one partitioner object per pool within a process.
"""

from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np

from fedtune.data.corpus import Corpus
from fedtune.errors import DataError

if TYPE_CHECKING:  # flwr_datasets pulls in matplotlib (1.5 s): import it only where partitioners are built
    from flwr_datasets.partitioner import Partitioner

# The pool (by fingerprint) we gave each partitioner. A partitioner accepts a dataset once and some
# replace it afterwards (ShardPartitioner sorts it), so `partitioner.dataset is pool` cannot tell.
_ASSIGNED: weakref.WeakKeyDictionary[Partitioner, str] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class ClientData:
    """One client's rows.

    Attributes:
        train: Rows the client trains on.
        val: Rows the client evaluates on (disjoint from ``train``).
    """

    train: datasets.Dataset
    val: datasets.Dataset


def subsample(dataset: datasets.Dataset, max_examples: int | None, seed: int) -> datasets.Dataset:
    """A uniform random subset of rows, in their original order.

    Args:
        dataset: Rows to choose from.
        max_examples: How many rows to keep; None, or a number at least ``len(dataset)``, keeps all.
        seed: The same seed gives the same rows.

    Returns:
        The subset.
    """
    if max_examples is None:
        return dataset
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise ValueError(f"max_examples must be a positive integer or None (all rows), got {max_examples!r}.")
    if max_examples >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    return dataset.select(np.sort(rng.choice(len(dataset), size=max_examples, replace=False)))


def split_test(corpus: Corpus, test_size: int | float, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Hold out a central test set; the rest is the pool that is split into clients.

    Args:
        corpus: The whole dataset.
        test_size: Number of test rows (a whole number >= 1) or a fraction of the rows (below 1).
        seed: The same seed gives the same split.

    Returns:
        ``(pool, test)``, disjoint, both shuffled.
    """
    n = len(corpus.dataset)
    if isinstance(test_size, bool) or not isinstance(test_size, (int, float)) or not test_size > 0:
        raise ValueError(f"test_size must be a row count >= 1 or a fraction in (0, 1), got {test_size!r}.")
    if test_size < 1:
        n_test = math.ceil(test_size * n)
    elif float(test_size).is_integer():
        n_test = int(test_size)
    else:
        raise ValueError(f"test_size={test_size} is neither a fraction below 1 nor a whole row count.")
    if n < 2:
        raise DataError(
            f"the data has {n} row(s): a run needs at least one test row (data.test_size) and one training row per "
            "client; use a larger file."
        )
    if not 1 <= n_test <= n - 1:
        raise ValueError(
            f"test_size={test_size} gives {n_test} test rows out of {n}: both the test set and the pool need "
            f"at least one row; choose a test_size between 1 and {n - 1} rows."
        )
    split = corpus.dataset.train_test_split(test_size=n_test, seed=seed, shuffle=True)
    return split["train"], split["test"]


def client_partition(
    pool: datasets.Dataset,
    partitioner: Partitioner,
    partition_id: int,
    val_fraction: float,
    seed: int,
) -> ClientData:
    """One client's train and validation rows.

    Args:
        pool: The rows left after ``split_test``.
        partitioner: A flwr-datasets partitioner; it is given ``pool`` on first use and must not hold
            another dataset.
        partition_id: Which client, in ``[0, partitioner.num_partitions)``.
        val_fraction: Share of the client's rows kept for validation, in [0, 1); when positive and the
            partition has at least 2 rows, validation gets at least 1 row and training keeps at least 1.
        seed: Seed of the train/validation split (combined with ``partition_id``, so clients differ).

    Returns:
        The client's disjoint train and validation rows.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}; 0 means no validation rows.")
    _assign(pool, partitioner)
    partition_id = operator.index(partition_id)
    num_partitions = partitioner.num_partitions
    if not 0 <= partition_id < num_partitions:
        raise ValueError(
            f"partition_id {partition_id} is out of range: {type(partitioner).__name__} has {num_partitions} "
            f"partitions (ids 0 to {num_partitions - 1}); match the number of clients to the partitioner."
        )
    if len(pool) < num_partitions:  # some partition would be empty (IidPartitioner raises IndexError)
        raise ValueError(
            f"the pool has {len(pool)} rows (the data less data.test_size's test rows) for {num_partitions} "
            f"clients: every client needs at least one, so the data needs {num_partitions - len(pool)} more row(s), or "
            "use fewer clients (federation.num_clients) or a smaller data.test_size."
        )
    part = partitioner.load_partition(partition_id)
    if len(part) == 0:
        raise ValueError(
            f"partition {partition_id} of {num_partitions} is empty (pool has {len(pool)} rows); use fewer "
            "partitions, a larger pool, or a partitioner with a minimum size (Dirichlet min_partition_size)."
        )
    n = len(part)
    n_val = 0 if val_fraction == 0.0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng([seed, partition_id]).permutation(n)
    return ClientData(train=part.select(np.sort(order[n_val:])), val=part.select(np.sort(order[:n_val])))


def partition_summary(
    pool: datasets.Dataset,
    partitioner: Partitioner,
    label_names: tuple[str, ...] | list[str] | None,
    val_fraction: float,
    seed: int,
    label_column: str = "label",
) -> dict[str, Any]:
    """Sizes and label histograms of every client, as ``client_partition`` would produce them.

    Args:
        pool: The rows left after ``split_test``.
        partitioner: The partitioner the clients use.
        label_names: Name of each label id, or None (ids are then named by number).
        val_fraction: As in ``client_partition``.
        seed: As in ``client_partition``.
        label_column: Column holding integer labels; without it (causal LM) only sizes are reported.

    Returns:
        ``{"pool", "train", "val", "label_names", "clients"}`` where ``clients`` has one dict per
        partition with ``id``, ``train``, ``val``, ``labels`` (counts per label id over train and val,
        or None) and ``natural_id`` (the column value for natural partitions, else None).
    """
    _assign(pool, partitioner)
    has_labels = label_column in pool.column_names
    names: list[str] | None = None
    if has_labels:
        num_labels = max(len(label_names or ()), int(np.max(np.asarray(pool[label_column]))) + 1)
        names = [label_names[i] if label_names and i < len(label_names) else str(i) for i in range(num_labels)]
    clients: list[dict[str, Any]] = []
    for partition_id in range(partitioner.num_partitions):
        data = client_partition(pool, partitioner, partition_id, val_fraction, seed)
        labels = None
        if names is not None:
            both = np.concatenate([np.asarray(data.train[label_column]), np.asarray(data.val[label_column])])
            labels = np.bincount(both.astype(np.int64), minlength=len(names)).tolist()
        # NaturalIdPartitioner fills this map on first use: partition i is the i-th value, sorted.
        natural_id = getattr(partitioner, "partition_id_to_natural_id", {}).get(partition_id)
        clients.append(
            {
                "id": partition_id,
                "train": len(data.train),
                "val": len(data.val),
                "labels": labels,
                "natural_id": natural_id,
            }
        )
    return {
        "pool": len(pool),
        "train": sum(client["train"] for client in clients),
        "val": sum(client["val"] for client in clients),
        "label_names": names,
        "clients": clients,
    }


def format_summary(summary: dict[str, Any], top: int = 3, width: int = 24) -> str:
    """A compact text table of ``partition_summary``: one line per client.

    Args:
        summary: What ``partition_summary`` returned (or the clients' own descriptions in its layout, where a
            plain-text client also says how many of its documents were ``truncated`` to ``model.max_length``).
        top: How many of each client's most frequent labels to show.
        width: Label names longer than this are cut.

    Returns:
        The table, lines joined by newlines.
    """
    clients = summary["clients"]
    lines = [
        f"{len(clients)} clients | pool {summary['pool']} rows -> train {summary['train']}, val {summary['val']}"
        f" (unassigned {summary['pool'] - summary['train'] - summary['val']})"
    ]
    show_natural = any(client["natural_id"] is not None for client in clients)
    show_truncated = any("truncated" in client for client in clients)
    if show_truncated:
        cut = sum(client.get("truncated", 0) for client in clients)
        lines[0] += f"; {cut} documents longer than model.max_length, trained on their first tokens only"
    header = f"{'client':>6} " + (f"{'natural id':<{width}} " if show_natural else "") + f"{'train':>7} {'val':>6}"
    header += f" {'truncated':>9}" if show_truncated else ""
    if summary["label_names"] is not None:
        header += f"  top labels (share of client rows, {len(summary['label_names'])} labels)"
    lines.append(header)
    for client in clients:
        line = f"{client['id']:>6} "
        if show_natural:
            line += f"{_cut(str(client['natural_id']), width):<{width}} "
        line += f"{client['train']:>7} {client['val']:>6}"
        line += f" {client.get('truncated', ''):>9}" if show_truncated else ""
        if client["labels"] is not None:
            counts = client["labels"]
            total = max(sum(counts), 1)
            ranked = sorted(range(len(counts)), key=lambda i: (-counts[i], i))[:top]
            names = summary["label_names"]
            shares = [f"{_cut(names[i], width)} {100 * counts[i] / total:.0f}%" for i in ranked if counts[i]]
            line += "  " + " | ".join(shares)
        lines.append(line)
    return "\n".join(lines)


def _assign(pool: datasets.Dataset, partitioner: Partitioner) -> None:
    """Give ``pool`` to ``partitioner`` once; refuse a partitioner that holds another dataset."""
    if not partitioner.is_dataset_assigned():
        partitioner.dataset = pool
        _ASSIGNED[partitioner] = pool._fingerprint
        return
    if _ASSIGNED.get(partitioner) == pool._fingerprint or partitioner.dataset is pool:
        return  # same pool: keep the partitioner's cached assignment
    raise ValueError(
        f"this {type(partitioner).__name__} already holds a different dataset; a partitioner accepts one "
        "dataset and caches its split, so build a new partitioner for each pool."
    )


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."
