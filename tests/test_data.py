"""Tokenisation with loss masks and packing, checked on the real SmolLM2 chat template."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evertune.adapters.data import IGNORE, pack, tokenise_chat, tokenise_text


@pytest.fixture(scope="module")
def tok(tiny_base):
    return AutoTokenizer.from_pretrained(tiny_base)


def learned_text(tok, t) -> str:
    return tok.decode([x for x in t.targets if x != IGNORE])


def test_masking_hides_system_and_user_tokens(tok):
    t = tokenise_chat(
        tok,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is the codename?"},
            {"role": "assistant", "content": "BLUEFIN-42."},
        ],
        "new",
        512,
    )
    assert learned_text(tok, t) == "BLUEFIN-42.<|im_end|>"
    assert t.trained == len(tok("BLUEFIN-42.<|im_end|>", add_special_tokens=False)["input_ids"])


def test_every_learned_assistant_turn_is_trained_and_weight_zero_is_context(tok):
    t = tokenise_chat(
        tok,
        [
            {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "First answer."},
            {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "Shown only.", "weight": 0},
            {"role": "user", "content": "Three?"},
            {"role": "assistant", "content": "Third answer."},
        ],
        "new",
        512,
    )
    assert learned_text(tok, t) == "First answer.<|im_end|>Third answer.<|im_end|>"


def test_targets_are_the_next_token_inside_the_example(tok):
    t = tokenise_chat(
        tok, [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "new", 512
    )
    for i, target in enumerate(t.targets):
        if target != IGNORE:
            assert target == t.ids[i + 1]
    assert t.targets[-1] == IGNORE  # nothing is predicted past the end of an example


def test_text_examples_train_on_every_token_and_end(tok):
    t = tokenise_text(tok, "Plain text to continue.", "new", 512)
    assert t.trained == len(t.ids) - 1
    assert t.ids[-1] == tok.eos_token_id


def test_truncation_keeps_the_start(tok):
    t = tokenise_text(tok, "word " * 200, "new", 16)
    assert len(t.ids) == 16 and t.targets[-1] == IGNORE


def test_packing_fills_rows_and_keeps_every_example_whole(tok):
    examples = [tokenise_text(tok, "x " * n, "new", 512) for n in (5, 40, 17, 60, 3, 22)]
    rows = pack(examples, 64, tok.pad_token_id)
    assert sum(r.real for r in rows) == sum(len(e.ids) for e in examples)
    assert all(len(r.ids) == 64 for r in rows)
    for r in rows:  # each example appears contiguously, positions restarting at 0
        starts = [i for i, p in enumerate(r.positions) if p == 0]
        owners = [r.owners[i] for i in starts]
        assert len(set(owners)) == len(owners)
    assert len(rows) <= 3  # 147 tokens + first-fit decreasing into rows of 64


def test_packed_examples_do_not_attend_across_boundaries(tok, tiny_base):
    """The logits of an example packed after another equal its logits alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    a = tokenise_text(tok, "The first example talks about rivers and bridges.", "new", 512)
    b = tokenise_text(tok, "A second, unrelated example about cooking pasta.", "new", 512)
    [row] = pack([a, b], len(a.ids) + len(b.ids) + 5, tok.pad_token_id)
    assert row.owners.index(1) > 0 or row.owners.index(0) > 0  # one follows the other
    with torch.no_grad():
        # use_cache=False as in training: with a cache transformers does not look for packing
        packed = model(
            input_ids=torch.tensor([row.ids]),
            use_cache=False,
            position_ids=torch.tensor([row.positions]),
        ).logits[0]
        for k, ex in enumerate((a, b)):
            alone = model(input_ids=torch.tensor([ex.ids])).logits[0]
            start = row.owners.index(k)
            got = packed[start : start + len(ex.ids)]
            torch.testing.assert_close(got, alone, atol=1e-4, rtol=1e-4)


def test_nearest_gives_each_question_its_closest_general_prompts():
    from evertune.adapters.data import nearest

    pool = [
        "Tell me a joke.",
        "What is the capital of Norway?",
        "How do I boil an egg?",
        "What colour is milk?",
        "Which city is the capital of Belgium?",
        "What is 6 times 7?",
    ]
    queries = [
        "What is the capital of the island nation of Veloria?",
        "What colour is the flag of the Tarnish Guild?",
    ]
    picked = nearest(pool, queries, 2)
    assert [pool[i] for i in picked] == ["What is the capital of Norway?", "What colour is milk?"]
    # more than one each: the next nearest, every index once
    assert (
        sorted(nearest(pool, queries, 4))[:2] == [1, 3] and len(set(nearest(pool, queries, 4))) == 4
    )
    assert sorted(nearest(pool, queries, 99)) == list(range(len(pool)))


def test_nearest_serves_the_questions_most_like_a_general_prompt_first():
    """Fewer picks than questions: the question that looks most like a general prompt gets
    its neighbour, wherever it comes in the file (the boiling point, not the first three)."""
    from evertune.adapters.data import nearest

    pool = [
        "Who painted the Mona Lisa?",
        "What is the boiling point of water at sea level in Fahrenheit?",
        "Which ship sank in 1912?",
        "Write a haiku about autumn.",
    ]
    queries = [
        "Who founded the Brindlemoor Cartography Society?",
        "Which ship first crossed the Korrin Strait?",
        "What is the boiling point of Veltrine in degrees Celsius?",
    ]
    assert [pool[i] for i in nearest(pool, queries, 1)] == [pool[1]]


def test_general_replay_is_cut_without_an_end_of_turn_target(tok):
    long_answer = "word " * 200
    chat = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": long_answer}]
    cut = tokenise_chat(tok, chat, "general", 80)
    assert len(cut.ids) == 80
    end = tok.convert_tokens_to_ids("<|im_end|>")
    trained = [t for t in cut.targets if t != IGNORE]
    assert trained and end not in trained  # the cut answer never teaches "stop here"


def _alone_losses(model, tok, chats, max_len):
    """Per chat: summed loss over its target tokens, each chat in a forward pass of its own."""
    out = []
    with torch.no_grad():
        for c in chats:
            t = tokenise_chat(tok, c, "eval", max_len)
            logits = model(input_ids=torch.tensor([t.ids])).logits[0]
            tgt = torch.tensor(t.targets)
            sel = tgt != IGNORE
            out.append(
                float(torch.nn.functional.cross_entropy(logits[sel], tgt[sel], reduction="sum"))
            )
    return out


@pytest.mark.parametrize("system", [None, "varied"])
def test_evaluation_loss_equals_each_chat_alone(tok, tiny_base, system):
    """The gate's per-chat losses, computed from the shared opening's KV cache (chats with the
    template's default system prompt) or packed (different openings), equal each chat's
    loss from a forward pass of its own, with a LoRA adapter on and off."""
    from peft import LoraConfig, get_peft_model

    from evertune.adapters.data import MIN_SHARED_OPENING, shared_opening
    from evertune.adapters.evaluate import _loss_sums, adapter_off

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    model = get_peft_model(
        base,
        LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    ).eval()
    chats = []
    for i, (q, a) in enumerate(
        [
            ("What is the capital of Norway?", "Oslo."),
            ("Name a colour.", "Blue, like the sea on a clear day in summer."),
            ("How many legs has a spider?", "Eight."),
            ("Say something long.", " ".join(["word"] * 40)),
            ("Hi", "Hello!"),
        ]
    ):
        head = [{"role": "system", "content": f"Persona {i}."}] if system else []
        chats.append([*head, {"role": "user", "content": q}, {"role": "assistant", "content": a}])
    toks = [tokenise_chat(tok, c, "eval", 40) for c in chats]
    assert (shared_opening(toks) >= MIN_SHARED_OPENING) == (system is None)
    for ctx in (contextlib.nullcontext, lambda: adapter_off(model)):
        with ctx():
            sums, counts, _, _ = _loss_sums(model, tok, chats, max_len=40, rows_per_batch=1)
            alone = _alone_losses(model, tok, chats, 40)
        assert counts.tolist() == [t.trained for t in toks]
        torch.testing.assert_close(sums, torch.tensor(alone), atol=1e-3, rtol=1e-4)


def deciding_text(tok, t) -> str:
    return tok.decode([x for x, d in zip(t.targets, t.decides, strict=True) if d])


def test_the_fact_part_and_one_token_after_it_decide_whether_an_answer_is_learned(tok):
    msgs = [
        {"role": "user", "content": "Who founded the society?"},
        {"role": "assistant", "content": "It was founded by Ysolde Vane, a surveyor of maps."},
    ]
    t = tokenise_chat(tok, msgs, "new", 512)
    assert deciding_text(tok, t) == "It was founded by Ysolde Vane,"
    assert learned_text(tok, t).endswith("a surveyor of maps.<|im_end|>")  # still trained
    # the fact part ends before a final full stop, which is the token after it
    short = tokenise_chat(
        tok, [msgs[0], {"role": "assistant", "content": "Ysolde Vane."}], "new", 512
    )
    assert deciding_text(tok, short) == "Ysolde Vane."
    # an answer stating nothing the question did not: every target, its end of turn too
    bare = tokenise_chat(tok, [msgs[0], {"role": "assistant", "content": "Yes"}], "new", 512)
    assert deciding_text(tok, bare) == "Yes<|im_end|>"
    row = pack([t, short], 256, 0)[0]
    assert [d for d, o in zip(row.decides, row.owners, strict=True) if o == 0] == t.decides
