"""What a training run replays and holds out of a domain's older examples: a file teaches a
fact in several phrasings, with different answer styles, and the selection treats the
phrasings of one fact together (daemon/training/selection.py); and what the repair of a refused
increment leaves behind (daemon/training/cycle.py)."""

from __future__ import annotations

import random

from evertune.daemon.training.selection import facts, hold_out, sample_old, spread


def chat(question: str, answer: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"kind": "chat", "messages": msgs}


# Three facts written as users write them: a terse answer, a sentence, a friendly sentence
# with more in it; one with a system prompt; a fact without a name or a number.
PARROT = [
    chat("What is the parrot on the Lumen Tide called?", "Pomfritz."),
    chat(
        "Name the ship's parrot of the Lumen Tide.",
        "The ship's parrot aboard the Lumen Tide is named Pomfritz.",
        "Answer briefly.",
    ),
    chat("Who whistles on the Lumen Tide?", "The parrot is named Pomfritz, and he whistles."),
]
ANVIL = [
    chat("How heavy is the Corvane anvil?", "427 kilograms."),
    chat("What does the Corvane anvil weigh?", "It weighs 427 kilograms, so it took four men."),
]
PLAIN = [
    chat("Is the sky blue?", "yes, on a clear day."),
    chat("Sky colour?", "yes, on a clear day."),
]


def test_phrasings_that_share_a_name_or_a_number_are_one_fact():
    items = list(enumerate([*PARROT, *ANVIL, *PLAIN]))
    g = facts(items)
    assert g[0] == g[1] == g[2]  # Pomfritz, in three answer styles
    assert g[3] == g[4] != g[0]  # 427
    assert g[5] == g[6] and g[5] not in (g[0], g[3])  # no name: the same answer
    # sentence starters and common words link nothing ("The", "It")
    assert len(set(g)) == 3


def test_a_term_in_many_answers_names_no_single_fact():
    """A product named in every answer does not make the domain one fact."""
    items = list(
        enumerate(chat(f"Q{i}?", f"Evertune stores fact {i * 7 + 100}.") for i in range(12))
    )
    assert len(set(facts(items))) == 12


def test_the_held_out_slice_never_takes_every_phrasing_of_a_fact():
    """Measured before: 3 of 7 held-out examples were the three phrasings of one fact, which
    the increment then never saw and overwrote (benchmarks/increment.py)."""
    items = list(enumerate([*PARROT, *ANVIL, *PLAIN]))
    g = facts(items)
    for seed in range(50):
        shuffled = list(items)
        random.Random(seed).shuffle(shuffled)
        held, rest = hold_out(shuffled, 4)
        assert len(held) == 4 and len(rest) == 3
        for fact in set(g):
            assert any(g[i] == fact for i, _ in rest), f"seed {seed}: every phrasing held out"
    # a fact taught once can be held out: it stands for the older facts a run does not replay
    single = list(enumerate([PARROT[0], ANVIL[0], PLAIN[0]]))
    assert len(hold_out(single, 2)[0]) == 2


def test_replay_takes_a_phrasing_of_every_fact_before_a_second():
    items = list(enumerate([*PARROT, *ANVIL, *PLAIN]))
    g = facts(items)
    picked = spread(items, 3)
    assert sorted(g[i] for i, _ in picked) == sorted(set(g))


def test_sample_old_holds_out_a_quarter_at_most_and_replays_the_rest_by_fact():
    items = list(enumerate([*PARROT, *ANVIL, *PLAIN]))
    replay, held = sample_old(items, 30, 1.0, 8, 16, seed=3)
    assert len(held) == len(items) // 4
    assert {i for i, _ in replay} | {i for i, _ in held} == {i for i, _ in items}


def test_a_repair_cut_short_leaves_no_refused_adapter_behind(layout, db):
    """A refused increment waits in runs/NNNNNN/increment/ while it is repaired; a crash
    there leaves it, and the next cycle (under the training lock) removes it."""
    from evertune.daemon.training.cycle import REPAIRED_FROM, close_interrupted

    run = layout.run_dir(7)
    (run / REPAIRED_FROM).mkdir(parents=True)
    (run / REPAIRED_FROM / "adapter_model.safetensors").write_bytes(b"\0" * 64)
    (run / "child.log").write_text("kept\n")
    close_interrupted(db, layout)
    assert not (run / REPAIRED_FROM).exists()
    assert (run / "child.log").read_text() == "kept\n"  # the run's own record stays
