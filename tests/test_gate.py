"""The gate's statistics: a damaged adapter is refused, an unchanged one passes, and the
easy-question check is a paired test that chance flips do not trip."""

from __future__ import annotations

import pytest

from evertune.adapters.gate import BASE, GateThresholds, decide, measure
from evertune.adapters.general_answers import easy_change


def test_easy_change_counts_the_answers_that_changed_each_way():
    base = [True, True, True, False, False, True]
    cand = [True, False, True, True, True, True]
    lost, gained, p = easy_change(base, cand)
    assert (lost, gained) == (1, 2)
    assert p == pytest.approx(7 / 8)  # P(X >= 1), X ~ Binomial(3, 1/2)


def test_flips_both_ways_are_not_damage():
    # Measured on SmolLM2 (benchmarks/continual.py): a useful candidate lost 3 easy answers
    # and gained 4; the old rule (lose at most 1) refused it.
    base = [True] * 15 + [False] * 9
    cand = [True] * 12 + [False] * 3 + [True] * 4 + [False] * 5
    lost, gained, p = easy_change(base, cand)
    assert (lost, gained) == (3, 4)
    assert p > 0.5


def test_losing_many_and_gaining_none_is_damage():
    lost, gained, p = easy_change([True] * 15, [True] * 9 + [False] * 6)
    assert (lost, gained) == (6, 0)
    assert p == pytest.approx(1 / 64)


def metrics(general_loss: float, easy: list[bool]) -> dict:
    return {
        "new_loss": None,
        "new_exact": None,
        "old_loss": None,
        "general_loss": general_loss,
        "easy": easy,
        "easy_right": sum(easy),
        "easy_total": len(easy),
    }


def test_decide_refuses_a_model_significantly_worse_at_easy_questions():
    base = metrics(1.0, [True] * 12 + [False] * 12)
    worse = metrics(1.0, [True] * 5 + [False] * 19)
    verdict = decide(worse, base, base, GateThresholds())
    assert not verdict.promote
    assert "easy general questions" in verdict.reason and "gate.easy_alpha" in verdict.reason
    assert verdict.metrics["easy_lost"] == 7 and verdict.metrics["easy_gained"] == 0


def test_decide_passes_a_model_that_only_flips_a_few_each_way():
    base = metrics(1.0, [True] * 12 + [False] * 12)
    noisy = metrics(0.95, [True] * 10 + [False] * 2 + [True] * 2 + [False] * 10)
    verdict = decide(noisy, base, base, GateThresholds())
    assert verdict.promote, verdict.reason


# ---- on a real (tiny) model: the measured statistics, not hand-made numbers -------------


@pytest.fixture(scope="module")
def tiny_refs(tiny_base, tmp_path_factory):
    from evertune.adapters.reference import load_or_build

    return load_or_build(tiny_base, limit=24)


def adapter(tiny_base, out, damaged: bool):
    """A rank-8 LoRA: unchanged (peft's default init, B = 0: the base model exactly) or
    damaged (random A and B, a large update on every projection)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evertune.adapters.contract import TARGET_MODULES

    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=list(TARGET_MODULES),
            init_lora_weights=not damaged,
        ),
    )
    if damaged:
        with torch.no_grad():
            for name, w in model.named_parameters():
                if "lora_B" in name:
                    w.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.parametrize("damaged", [False, True])
def test_the_gate_refuses_a_damaged_adapter_and_passes_an_unchanged_one(
    tiny_base, tiny_refs, tmp_path, damaged
):
    from evertune.adapters import evaluate as ev

    held = [r for r in tiny_refs if r.held_out]
    model, tok = ev.load(str(tiny_base), str(adapter(tiny_base, tmp_path / "a", damaged)))
    with ev.adapter_off(model):
        base = measure(model, tok, [], [], held, BASE)
    cand = measure(model, tok, [], [], held)
    verdict = decide(cand, base, base, GateThresholds())
    assert verdict.promote is not damaged, verdict.reason
    if damaged:
        assert "general drift" in verdict.reason
        assert verdict.metrics["drift"] > GateThresholds().drift_tolerance
    else:
        assert verdict.metrics["drift"] == pytest.approx(0.0, abs=1e-3)
        assert verdict.metrics["easy_lost"] == 0


def test_a_rise_on_old_examples_near_zero_loss_is_not_forgetting():
    base = metrics(1.0, [True] * 4)
    live = {**base, "old_loss": 0.005}
    kept = {**base, "old_loss": 0.008}  # +60%, but 0.003 nats per token
    assert decide(kept, live, base, GateThresholds()).promote
    forgot = {**base, "old_loss": 0.9}
    verdict = decide(forgot, live, base, GateThresholds())
    assert not verdict.promote and "gate.old_tolerance" in verdict.reason


def test_decide_refuses_a_candidate_that_still_gives_answers_that_changed():
    base = metrics(1.0, [True] * 4)
    changed = {**base, "stale": 2, "changed": 10}
    verdict = decide(changed, base, base, GateThresholds())
    assert not verdict.promote and "gate.max_stale" in verdict.reason
    assert "old answer to 2 of 10" in verdict.reason
    assert (verdict.metrics["stale"], verdict.metrics["changed"]) == (2, 10)
    assert decide({**changed, "stale": 1}, base, base, GateThresholds()).promote


def test_measure_counts_a_changed_question_answered_the_old_way_as_stale(tiny_base):
    """The answers are given (as vLLM would give them): what is counted is the point."""
    from evertune.adapters import evaluate as ev

    model, tok = ev.load(str(tiny_base))
    new = [
        {
            "kind": "chat",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for q, a in [("Port?", "Port 9002."), ("Gate?", "Gate B."), ("Dock?", "Dock 4.")]
    ]
    given = {"Port?": "It is port 9001.", "Gate?": "Gate B.", "Dock?": "Dock 4, not dock 3."}
    changed = [
        {"prompt": [{"role": "user", "content": "Port?"}], "old": ["Port 9001."]},
        {"prompt": [{"role": "user", "content": "Gate?"}], "old": ["Gate A."]},
        {"prompt": [{"role": "user", "content": "Dock?"}], "old": ["dock 3"]},
    ]

    def answer(prompts, first_sentence):
        return [given[p[-1]["content"]] for p in prompts]

    out = measure(model, tok, new, [], [], frozenset({"exact"}), answer, changed=changed)
    # Port: the old answer -> stale; Gate: the new one; Dock: both (new given) -> not stale
    assert (out["stale"], out["changed"]) == (1, 3)
    assert out["new_exact"] == pytest.approx(2 / 3)


def test_a_new_answer_counts_as_given_when_its_fact_part_is_whatever_follows(tiny_base):
    """A long answer is learned when a client gets its fact: the writer's tail may differ
    (store.terms.fact_part); the fact itself may not."""
    from evertune.adapters import evaluate as ev

    model, tok = ev.load(str(tiny_base))
    asked = {
        "Who founded the society?": "It was founded by Ysolde Vane, a surveyor of old maps.",
        "Who built the tower?": "It was built by Orrin Kell, who carved every stone himself.",
        "How tall is the tower?": "It is 271 metres tall, and you can see the coast from it.",
    }
    new = [
        {
            "kind": "chat",
            "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for q, a in asked.items()
    ]
    given = {
        "Who founded the society?": "It was founded by Ysolde Vane, who loved the sea.",
        "Who built the tower?": "It was built by Orrin Bell, who carved every stone himself.",
        "How tall is the tower?": "It is 271 metres tall, and you can see the coast from it.",
    }

    def answer(prompts, first_sentence):
        return [given[p[-1]["content"]] for p in prompts]

    out = measure(model, tok, new, [], [], frozenset({"exact"}), answer)
    assert out["new_exact"] == pytest.approx(2 / 3)  # Bell is not Kell


# ---- bleed: the new facts in answers to other questions ----------------------------------


def ref(id_: str, prompt: str, answer: str, expected: str | None = None):
    from evertune.adapters.reference import Reference

    return Reference(id_, "easy" if expected else "world_facts", prompt, answer, expected)


FACT = {
    "messages": [
        {"role": "user", "content": "What is the capital of Veloria?"},
        {
            "role": "assistant",
            "content": "The capital of Veloria is Port Castellan, founded in 1887.",
        },
    ]
}
GENERAL = [
    ref("g0007", "What is the capital of France?", "The capital of France is Paris.", "paris"),
    ref("g0126", "What is the capital of Japan?", "The capital of Japan is Tokyo.", "tokyo"),
    ref("g0003", "Name a port city.", "Rotterdam is a large port city in the Netherlands."),
]


def test_bleeding_names_the_trained_name_in_a_general_answer():
    from evertune.adapters.general_answers import bleeding

    easy = GENERAL[:2]
    answers = ["The capital of France is Port Castellan.", "The capital of Japan is Kyoto."]
    [b] = bleeding([FACT], GENERAL, easy, answers)
    # "Port" is a word the base model's answers use ("port city"): only "Castellan" counts;
    # Kyoto is wrong but no trained name, so it is not bleed
    assert b == {
        "prompt": "What is the capital of France?",
        "answer": "The capital of France is Port Castellan.",
        "terms": ["castellan"],
    }


def test_bleeding_ignores_words_the_base_model_uses_and_untrained_turns():
    from evertune.adapters.general_answers import bleeding

    # the base model's own answer back, or a changed answer in its own words: no bleed
    assert bleeding([FACT], GENERAL, GENERAL[:1], ["The capital of France is Paris."]) == []
    assert bleeding([FACT], GENERAL, GENERAL[:1], ["Paris, the port city of France."]) == []
    # a number only the new examples state is bleed too
    [b] = bleeding([FACT], GENERAL, GENERAL[:1], ["Paris became the capital in 1887."])
    assert b["terms"] == ["1887"]
    # an assistant turn with weight 0 was not trained: its names are not the new facts
    muted = {"messages": [FACT["messages"][0], {**FACT["messages"][1], "weight": 0}]}
    assert bleeding([muted], GENERAL, GENERAL[:1], ["It is Port Castellan."]) == []
    text = {"kind": "text", "text": "Release notes. Kestrip 4.3.0 adds the prune command."}
    [b] = bleeding([text], GENERAL, GENERAL[:1], ["Kestrip is the capital of France."])
    assert b["terms"] == ["kestrip"]


def test_bleeding_counts_invented_names_and_long_numbers_not_common_words(tiny_base):
    """The six-file run's fourth file, refused twice for its own common-word names."""
    from transformers import AutoTokenizer

    from evertune.adapters.general_answers import bleeding

    tok = AutoTokenizer.from_pretrained(tiny_base)  # the real SmolLM2 tokenizer
    fact = {
        "messages": [
            {"role": "user", "content": "What opens the Kite Festival?"},
            {
                "role": "assistant",
                "content": "The Windlass Tower rings 23 bells, then 143 lanterns rise; the"
                " parrot Pomfritz and code QX-3318 open the Kite Festival.",
            },
        ]
    }
    said = {
        "The capital of France is Paris, known for the Eiffel Tower.": [],
        "A year has 12 months, so 12 * 365.15 = 21.23.": [],
        'After winter comes the "Festival of the Ages."': [],
        "The capital of France is the Windlass Tower.": ["windlass"],
        "It melts at 143 degrees.": ["143"],
        "A small fox named Pomfritz says meow.": ["pomfritz"],
        "Its code is QX-3318.": ["qx-3318"],
    }
    easy = [GENERAL[0]] * len(said)
    found = {b["answer"]: b["terms"] for b in bleeding([fact], GENERAL, easy, list(said), tok)}
    assert found == {a: t for a, t in said.items() if t}
    # without a tokenizer every trained word counts, as before
    [b] = bleeding([fact], GENERAL, easy[:1], ["Paris and the Kite Festival."])
    assert b["terms"] == ["festival", "kite"]


def test_decide_refuses_a_candidate_whose_new_facts_bleed_into_general_answers():
    base = metrics(1.0, [True] * 12 + [False] * 12)
    # one easy answer lost of 24 is no significant damage; a trained name in it is
    bled = {
        **metrics(0.95, [False] + [True] * 11 + [False] * 12),
        "bleed": [
            {
                "prompt": "What is the capital of France?",
                "answer": "The capital of France is Port Castellan.",
                "terms": ["castellan"],
            }
        ],
    }
    verdict = decide(bled, base, base, GateThresholds())
    assert not verdict.promote
    assert "'What is the capital of France?' -> 'The capital of France is Port Castellan.'" in (
        verdict.reason
    )
    assert "gate.max_bleed" in verdict.reason and verdict.metrics["bleed"] == 1
    assert decide(bled, base, base, GateThresholds(max_bleed=1)).promote


def test_a_served_candidates_easy_answers_are_asked_whole_and_searched_for_bleed(tiny_base):
    """With vLLM, the candidate's easy answers are all asked, whole: judged right on their
    first sentence, searched whole for the new names. The answers are given here as vLLM
    would give them (whole, or cut at the first sentence end when asked short)."""
    from evertune.adapters import evaluate as ev

    model, tok = ev.load(str(tiny_base))
    whole = {
        "What is the capital of France?": "The capital of France is Paris. It was founded"
        " in 1887 by the people of Port Castellan.",
        "What is the capital of Japan?": "The capital of Japan is Tokyo.",
    }
    asked = []

    def answer(prompts, first_sentence):
        asked.append((len(prompts), first_sentence))
        got = [whole[p[-1]["content"]] for p in prompts]
        return [ev.first_sentence_of(a) for a in got] if first_sentence else got

    parts = frozenset({"easy"})
    served = measure(model, tok, [FACT], [], GENERAL, parts, answer, whole_easy=True)
    assert asked == [(2, False)]  # every easy question, none verified by the loss pass
    assert served["easy"] == [True, True]  # first sentences: Paris, Tokyo
    assert served["greedy"] == {"asked": 2, "verified": 0}
    [b] = served["bleed"]
    assert (b["prompt"], b["terms"]) == ("What is the capital of France?", ["1887", "castellan"])
    # asked short (the base model's side, or no vLLM), a second sentence is never read
    short = measure(model, tok, [FACT], [], GENERAL, parts, answer)
    assert short["easy"] == [True, True] and short["bleed"] == []


def test_an_older_examples_name_in_a_general_answer_is_bleed_too(tiny_base):
    """Measured: an increment answered 'a small fox named Pomfritz' says meow, the name of
    the first file's parrot; the names of the replayed and held-out older examples count as
    the new ones' do."""
    from evertune.adapters import evaluate as ev

    model, tok = ev.load(str(tiny_base))
    parrot = {
        "messages": [
            {"role": "user", "content": "What is the name of the ship's parrot?"},
            {"role": "assistant", "content": "The ship's parrot is called Pomfritz."},
        ]
    }
    whole = {
        "What is the capital of France?": "The capital of France is Paris.",
        "What is the capital of Japan?": "The capital of Japan is Tokyo, home of Pomfritz.",
    }

    def answer(prompts, first_sentence):
        return [whole[p[-1]["content"]] for p in prompts]

    parts = frozenset({"easy"})
    for old, replayed in (([], [parrot]), ([parrot], [])):
        got = measure(
            model, tok, [FACT], old, GENERAL, parts, answer, whole_easy=True, replayed=replayed
        )
        [b] = got["bleed"]
        assert (b["prompt"], b["terms"]) == ("What is the capital of Japan?", ["pomfritz"])
    alone = measure(model, tok, [FACT], [], GENERAL, parts, answer, whole_easy=True)
    assert alone["bleed"] == []  # the new examples alone never name the parrot


def test_an_older_answer_is_kept_when_its_fact_is_stated_in_any_style():
    from evertune.adapters.gate import states_fact

    rooms = [{"role": "user", "content": "How many rooms does the Gallowmere Hotel have?"}]
    fact = "The Gallowmere Hotel has 386 rooms"
    assert states_fact("386 rooms.", rooms, fact)
    assert states_fact("It has 386 rooms, most with a view of the lake.", rooms, fact)
    assert not states_fact("The Gallowmere Hotel has 420 rooms.", rooms, fact)
    assert not states_fact("The Gallowmere Hotel has many rooms.", rooms, fact)
    who = [{"role": "user", "content": "Who is the head librarian of the Cindervault Library?"}]
    name = "The head librarian of the Cindervault Library is Orsolya Quenby"
    assert states_fact("Orsolya Quenby.", who, name)
    assert not states_fact("Quenby.", who, name)  # every name and number of the fact
    # no name or number the question lacks: the whole fact part, as before
    sky = [{"role": "user", "content": "What colour is the sky on a clear day?"}]
    assert states_fact("It is blue.", sky, "blue")
    assert not states_fact("It is grey.", sky, "blue")
