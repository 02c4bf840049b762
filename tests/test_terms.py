"""What an answer states (store/terms.py): its names and numbers, and its fact part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evertune.store.terms import fact_part, key_terms

FACTS = json.loads(
    (Path(__file__).parent.parent / "benchmarks" / "continual_facts.json").read_text()
)


def test_key_terms_are_names_and_numbers_not_sentence_starters():
    assert key_terms("It was founded by Ysolde Partridge-Vane in 1906.") == {
        "ysolde",
        "partridge-vane",
        "1906",
    }
    assert key_terms("The river is wide.") == set()


@pytest.mark.parametrize(
    ("question", "answer", "part"),
    [
        (
            "Who founded the Brindlemoor Cartography Society?",
            "It was founded by Ysolde Partridge-Vane, a surveyor who started it with friends.",
            "It was founded by Ysolde Partridge-Vane",
        ),
        # the names in the question are not the fact: the first new word's clause is
        (
            "What does Pellucid Forge sell?",
            "Pellucid Forge sells glass bicycle bells, each one blown by hand.",
            "Pellucid Forge sells glass bicycle bells",
        ),
        # the clause of the last new name, not the first
        (
            "Who signed the treaty?",
            "Duke Orvel signed it with Queen Amsa - ending the war.",
            "Duke Orvel signed it with Queen Amsa",
        ),
        ("How many rooms does the hotel have?", "386 rooms.", "386 rooms"),
        # nothing new to anchor on, or nothing after the fact's clause: the whole answer
        ("Is it big?", "Yes.", "Yes."),
        ("What colour is the door?", "The door is blue", "The door is blue"),
    ],
)
def test_fact_part_ends_with_the_clause_that_states_the_fact(question, answer, part):
    assert fact_part(answer, question) == part


def test_every_benchmark_answer_keeps_its_fact_in_its_fact_part():
    """On the 600 answers of the benchmark's files (three styles, three phrasings a fact):
    the checked term is in every fact part, and the long answers' tails are cut."""
    cut = 0
    for facts in FACTS:
        for f in facts:
            for q, a in zip([f["question"], *f["rephrasings"]], f["answers"], strict=True):
                part = fact_part(a, q)
                assert f["expected"] in part.lower(), (q, a, part)
                cut += len(part) < len(a) - 1
    assert cut >= 150  # the friendly answers (a third of 600) have tails
