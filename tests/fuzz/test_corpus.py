"""Every fuzz target (`fuzz.targets`) in `make test`: its kept corpus replayed, then byte
mutations of that corpus through Hypothesis (`tests.fuzz.strategies`).

The structured side, inputs built field by field, is in the other files of this folder.  The
corpus test also holds the corpus to the seeds the targets make (`make fuzz-corpus` writes them
again), so a seed that changed with its parser is not forgotten in the repository.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz.targets import NAMES
from tests.fuzz.strategies import CORPUS, FUZZ, corpus, mutants, target


@pytest.mark.parametrize("name", NAMES)
def test_the_corpus_holds_the_seeds(name: str) -> None:
    seeds = {f"seed-{label}" for label in target(name).seeds()}
    kept = {path.name for path in (CORPUS / name).glob("seed-*")}
    assert kept == seeds, f"run `make fuzz-corpus TARGET={name}`"


@pytest.mark.parametrize("name", NAMES)
def test_mutations_of_the_corpus_keep_the_contract(name: str) -> None:
    check = target(name).check
    inputs = corpus(name)
    for data in inputs:  # the regression inputs, and the first calls (imports, caches)
        check(data)

    @FUZZ
    @given(mutants(inputs) | st.binary(max_size=512))
    def mutated(data: bytes) -> None:
        check(data)

    mutated()
