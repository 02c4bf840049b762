"""Training on a tiny random Llama: incremental, cancellable, deterministic, servable output."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from evertune.adapters.contract import TARGET_MODULES, TrainSpec
from evertune.adapters.errors import TrainingCancelled, TrainingError
from evertune.adapters.registry import check_files
from evertune.adapters.train import train


def chat(q: str, a: str) -> dict:
    return {
        "kind": "chat",
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
    }


FACTS = [
    chat(f"What is the code of vault {i}?", f"The code of vault {i} is {1000 + 37 * i}.")
    for i in range(6)
]
# The same facts with a tail after each: their fact parts, not the tails and the end of
# turn (which the tiny model cannot learn), decide whether they are learned
TAILS = [
    chat(f"What is the code of vault {i}?", f"It is {1000 + 37 * i}, as the keeper says.")
    for i in range(6)
]


def spec(base, out, **kw) -> TrainSpec:
    defaults = {
        "rank": 8,
        "alpha": 16,
        "lr": 3e-3,
        "max_epochs": 3,
        "min_epochs": 3,
        "row_len": 128,
        "rows_per_step": 2,
        "max_seq_len": 128,
    }
    return TrainSpec(base_path=str(base), out_dir=str(out), **{"new": FACTS, **defaults, **kw})


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def test_training_lowers_the_loss_on_the_new_examples(tiny_base, tmp_path):
    result = train(spec(tiny_base, tmp_path / "v1", lr=2e-2, max_epochs=8, min_epochs=8))
    first, last = result.history[0]["new_loss"], result.history[-1]["new_loss"]
    assert last < first * 0.7, result.history
    assert [h["epoch"] for h in result.history] == list(range(1, 9))
    assert result.tokens > 0 and result.trained_tokens < result.tokens  # prompts are masked


def test_saved_adapter_is_safetensors_and_servable_by_vllm(tiny_base, tmp_path):
    out = tmp_path / "v1"
    train(spec(tiny_base, out))
    check_files(out)
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert set(config["target_modules"]) <= set(TARGET_MODULES)
    assert config["bias"] == "none" and config["r"] == 8 and not config.get("use_dora")
    assert not config.get("modules_to_save")
    assert all("lm_head" not in k and "embed" not in k for k in weights(out))


def test_saved_adapter_loads_in_peft_and_changes_the_output(tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "v1"
    train(spec(tiny_base, out))
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out)
        after = tuned(ids).logits
    assert not torch.allclose(before, after)


def test_v2_starts_from_v1s_weights(tiny_base, tmp_path):
    v1 = tmp_path / "v1"
    train(spec(tiny_base, v1))
    # lr 0: any difference between v2 and v1 would come from where v2 started.
    v2 = tmp_path / "v2"
    train(spec(tiny_base, v2, parent_adapter=str(v1), lr=0.0, max_epochs=1, min_epochs=1))
    w1, w2 = weights(v1), weights(v2)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=0)
    fresh = tmp_path / "fresh"
    train(spec(tiny_base, fresh, lr=0.0, max_epochs=1, min_epochs=1))
    assert any(not torch.equal(weights(fresh)[k], w1[k]) for k in w1)


def test_weight_decay_pulls_an_increment_toward_the_base_model(tiny_base, tmp_path):
    """TrainSpec weight_decay (train.weight_decay): AdamW's decoupled decay shrinks the LoRA
    weights at every step, so a version trained on from its parent's adapter ends nearer
    the base model than without it, on the same data and steps."""
    v1 = tmp_path / "v1"
    train(spec(tiny_base, v1))
    size = {}
    for decay in (0.0, 5.0):
        out = tmp_path / f"v2-{decay}"
        train(spec(tiny_base, out, parent_adapter=str(v1), weight_decay=decay))
        w = weights(out)
        size[decay] = sum(float((w[k].float() ** 2).sum()) for k in w)
    assert size[5.0] < 0.9 * size[0.0], size


def test_same_seed_gives_the_same_adapter(tiny_base, tmp_path):
    train(spec(tiny_base, tmp_path / "a", seed=7))
    train(spec(tiny_base, tmp_path / "b", seed=7))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0)


def test_stop_flag_cancels_between_steps_and_saves_nothing(tiny_base, tmp_path):
    calls = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    seen = []
    with pytest.raises(TrainingCancelled, match="cancelled at step 2"):
        train(spec(tiny_base, tmp_path / "v1"), progress=seen.append, should_stop=should_stop)
    assert [p["step"] for p in seen] == [1, 2]
    assert not (tmp_path / "v1").exists()


def test_progress_reports_step_loss_speed_and_eta(tiny_base, tmp_path):
    seen = []
    result = train(spec(tiny_base, tmp_path / "v1"), progress=seen.append)
    assert [p["step"] for p in seen] == list(range(1, result.steps + 1))
    assert all({"steps", "loss", "tokens_per_s", "eta_s", "epoch"} <= p.keys() for p in seen)
    assert seen[-1]["eta_s"] == 0


def test_replay_and_general_examples_are_trained_too(tiny_base, tmp_path):
    replay = [chat("Old question?", "Old answer.")]
    general = [chat(f"General question {i}?", f"General answer {i}.") for i in range(4)]
    alone = train(spec(tiny_base, tmp_path / "a"))
    mixed = train(
        spec(tiny_base, tmp_path / "b", replay=replay, general=general, general_per_epoch=2)
    )
    assert mixed.trained_tokens > alone.trained_tokens


def test_each_epoch_passes_over_the_domain_examples_new_passes_times_and_the_general_once(
    tiny_base, tmp_path
):
    replay = [chat("Old question?", "Old answer.")]
    general = [chat(f"General question {i}?", f"General answer {i}.") for i in range(4)]
    kw = {"max_epochs": 1, "min_epochs": 1, "graduate": False, "replay": replay}
    domain = train(spec(tiny_base, tmp_path / "d", new_passes=1, **kw))
    mixed = {"general": general, "general_per_epoch": 2, **kw}
    once = train(spec(tiny_base, tmp_path / "a", new_passes=1, **mixed))
    thrice = train(spec(tiny_base, tmp_path / "b", new_passes=3, **mixed))
    assert thrice.tokens - once.tokens == 2 * domain.tokens  # new and replayed, twice more
    assert thrice.steps > once.steps


def test_anchor_prompts_add_their_nearest_general_prompts_to_every_epoch(tiny_base, tmp_path):
    general = [chat(f"General question {i}?", f"General answer number {i}.") for i in range(4)]
    kw = {"max_epochs": 1, "min_epochs": 1, "graduate": False, "general": general}
    kw["general_nearest"] = 0.0  # no anchors of the new questions: the slice only
    everything = train(spec(tiny_base, tmp_path / "a", general_per_epoch=4, **kw))
    one = train(spec(tiny_base, tmp_path / "b", general_per_epoch=1, **kw))
    # a bleeding question's three nearest general prompts, besides the one-example slice:
    # the whole pool of four
    anchored = train(
        spec(
            tiny_base,
            tmp_path / "c",
            general_per_epoch=1,
            anchor_prompts=["General question 2?"],
            **kw,
        )
    )
    assert one.tokens < anchored.tokens == everything.tokens


def test_an_increment_anchors_the_general_prompts_nearest_its_replayed_questions_too(tmp_path):
    """Measured: after file 2 trained, file 1's parrot answered 'Which animal says "meow"?'.
    The general prompts nearest the replayed older questions are replayed too."""
    from evertune.adapters.data import general_anchors

    general = [
        chat("Which bird can learn to talk?", "Parrots can."),
        chat("What is the capital of Italy?", "Rome."),
        chat("How many legs does a spider have?", "Eight."),
        chat("What colour is the sky?", "Blue."),
    ]
    new = [chat("What is the capital of Veloria?", "Port Castellan.")]
    replay = [chat("What is the ship's parrot called? Which bird?", "Pomfritz.")]
    kw = {"new": new, "replay": replay, "general": general, "general_per_epoch": 4}
    kw["general_nearest"] = 0.5
    both, _ = general_anchors(spec("base", tmp_path, **kw))
    assert sorted(both) == [0, 1]  # Italy for the new question, the bird for the replayed
    only_new, _ = general_anchors(spec("base", tmp_path, near_replayed=False, **kw))
    assert 0 not in only_new and 1 in only_new


def test_with_several_passes_an_example_is_learned_by_its_last_sighting_of_the_epoch(
    tiny_base, tmp_path
):
    # the same run judged two ways: the last sighting of each example has had two more
    # updates than its first, so at least as many are learned, in every epoch, and the
    # run stops no later
    kw = {"lr": 3e-3, "max_epochs": 40, "min_epochs": 1, "learned_loss": 12.0}
    kw |= {"graduate": False, "new_passes": 3}  # (measured: 3 epochs against 4)
    last = train(spec(tiny_base, tmp_path / "a", learned_when="last", **kw))
    every = train(spec(tiny_base, tmp_path / "b", learned_when="every", **kw))
    assert last.learned == every.learned == len(FACTS)
    assert last.epochs < every.epochs
    assert all(
        a["learned"] >= b["learned"] for a, b in zip(last.history, every.history, strict=False)
    )


def test_training_stops_at_the_first_epoch_where_every_new_example_is_learned(tiny_base, tmp_path):
    # "Learned" means every target token's loss is under `learned_loss`. In the tiny model
    # the end-of-turn token is its pad token, whose tied embedding row is zero and gets no
    # gradient, so its loss stays high: the bar here is above it, and above no other token
    # at the start (no example is learned after the first epoch).
    kw = {"lr": 1e-2, "max_epochs": 40, "learned_loss": 13.0, "graduate": False}
    result = train(spec(tiny_base, tmp_path / "v1", min_epochs=1, **kw))
    learned = [h["learned"] for h in result.history]
    assert learned[0] < len(FACTS)
    assert learned[-1] == len(FACTS) and all(n < len(FACTS) for n in learned[:-1])
    assert result.learned == len(FACTS) and result.epochs == len(learned) < 40
    # and not before min_epochs
    longer = train(spec(tiny_base, tmp_path / "v2", min_epochs=len(learned) + 2, **kw))
    assert longer.epochs == len(learned) + 2


def test_examples_learned_with_a_margin_leave_the_later_epochs(tiny_base, tmp_path):
    # A bar of 26 nats: the tiny model's tokens start at ~11-14 nats (see above), so an
    # example leaves once its worst token is under 13, which training reaches for some
    # examples before others.
    kw = {"lr": 1e-2, "max_epochs": 3, "min_epochs": 3, "learned_loss": 26.0}
    kept = train(spec(tiny_base, tmp_path / "kept", graduate=False, **kw))
    left = train(spec(tiny_base, tmp_path / "left", **kw))
    assert [h["trained"] for h in kept.history] == [len(FACTS)] * 3
    trained = [h["trained"] for h in left.history]
    assert trained[0] == len(FACTS) and trained[-1] < len(FACTS)
    assert trained == sorted(trained, reverse=True)
    assert left.learned == len(FACTS)  # those that left count as learned
    assert left.tokens < kept.tokens


def test_once_new_examples_leave_older_ones_are_replayed_in_proportion(tiny_base, tmp_path):
    # as above (a bar the tiny model's examples pass one by one), with nine older examples
    # for six new ones: an epoch replays as many per new example still trained as the
    # first epoch did, rounded up
    old = [chat(f"Old question {i}?", f"Old answer {i}.") for i in range(9)]
    kw = {"lr": 1e-2, "max_epochs": 4, "min_epochs": 4, "learned_loss": 26.0, "replay": old}
    kw["new_passes"] = 1  # (with three, every example leaves at once)
    follows = train(spec(tiny_base, tmp_path / "follows", **kw))
    fixed = train(spec(tiny_base, tmp_path / "fixed", replay_follows=False, **kw))
    assert any(h["trained"] < len(FACTS) for h in follows.history)
    assert [h["replayed"] for h in follows.history] == [
        math.ceil(len(old) * h["trained"] / len(FACTS)) for h in follows.history
    ]
    assert [h["replayed"] for h in fixed.history] == [len(old)] * len(fixed.history)
    assert follows.tokens < fixed.tokens


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rank", 12, "cannot be served by vLLM"),
        ("target_modules", ("q_proj", "lm_head"), "cannot serve LoRA on"),
        ("new", [], "no new examples"),
        ("new_passes", 0, "new_passes is at least 1"),
        ("learned_when", "first", "learned_when is 'last' or 'every'"),
        ("attention", "flash", "attention is 'auto', 'eager' or 'sdpa'"),
    ],
)
def test_unservable_or_empty_specs_are_refused(tiny_base, tmp_path, field, value, message):
    with pytest.raises(TrainingError, match=message):
        train(spec(tiny_base, tmp_path / "v1", **{field: value}))


@pytest.mark.parametrize("kernel", ["eager", "sdpa"])
def test_a_step_from_the_shared_opening_equals_the_packed_step(tiny_base, kernel):
    """Training runs the shared opening (the default system prompt) once a step: the losses
    and the LoRA gradients equal those of the packed rows run whole, with either attention
    kernel (eager adds the mask to the scores; SDPA takes it as booleans)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evertune.adapters.data import IGNORE, after_opening, pack, shared_opening, tokenise_chat
    from evertune.adapters.train import _after_opening

    tok = AutoTokenizer.from_pretrained(tiny_base)
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(
            tiny_base, dtype=torch.float32, attn_implementation=kernel
        ),
        LoraConfig(
            r=8, lora_alpha=16, target_modules=list(TARGET_MODULES), init_lora_weights=False
        ),
    )
    pairs = [
        ("What is the capital of Norway?", "Oslo."),
        ("Name a colour.", "Blue, like the sea on a clear day."),
        ("How many legs has a spider?", "Eight."),
        ("Say something long.", " ".join(["word"] * 30)),
        ("Hi", "Hello!"),
    ]
    examples = [
        tokenise_chat(
            tok, [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "new", 80
        )
        for q, a in pairs
    ]
    n = shared_opening(examples)
    assert n == 24  # <|im_start|>system ... SmolLM, trained by Hugging Face ... user\n
    rows = pack(examples, 128, tok.pad_token_id)
    assert len(rows) == 2  # examples share rows: the mask must keep them apart
    body, head = model.get_base_model().model, model.get_base_model().lm_head
    params = [p for p in model.parameters() if p.requires_grad]

    def step(rows, hidden_of):
        ids, pos = torch.tensor([r.ids for r in rows]), torch.tensor([r.positions for r in rows])
        tgt, own = torch.tensor([r.targets for r in rows]), torch.tensor([r.owners for r in rows])
        sel = tgt != IGNORE
        per_token = torch.nn.functional.cross_entropy(
            head(hidden_of(ids, pos, own)[sel]), tgt[sel], reduction="none"
        )
        per_token.mean().backward()
        grads = [p.grad.clone() for p in params]
        model.zero_grad()
        return sorted(zip(own[sel].tolist(), per_token.tolist(), strict=True)), grads

    whole = step(rows, lambda i, p, o: body(input_ids=i, position_ids=p, use_cache=False)[0])
    cut = step(
        after_opening(rows, n, tok.pad_token_id),
        lambda i, p, o: _after_opening(body, examples[0].ids[:n], i, p, o),
    )
    assert [o for o, _ in whole[0]] == [o for o, _ in cut[0]]  # every target, once
    torch.testing.assert_close(
        torch.tensor([x for _, x in cut[0]]),
        torch.tensor([x for _, x in whole[0]]),
        atol=1e-4,
        rtol=1e-4,
    )
    for a, b in zip(whole[1], cut[1], strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_the_cpu_trains_with_eager_attention_unless_rows_are_wide(tiny_base, tmp_path):
    from evertune.adapters.train import EAGER_MAX_WIDTH, attention_kernel

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert attention_kernel(spec(tiny_base, tmp_path), cpu) == "eager"
    assert attention_kernel(spec(tiny_base, tmp_path), gpu) == "sdpa"
    wide = spec(tiny_base, tmp_path, max_seq_len=EAGER_MAX_WIDTH * 2)
    assert attention_kernel(wide, cpu) == "sdpa"
    assert attention_kernel(spec(tiny_base, tmp_path, attention="sdpa"), cpu) == "sdpa"


def test_a_documents_passages_do_not_hold_training_once_its_questions_are_learned(
    tiny_base, tmp_path
):
    """A passage (a text example) is read, not recited: with questions beside it, training
    stops once they are learned; a passage alone still trains until it is learned."""
    rng = random.Random(0)
    passage = {"kind": "text", "text": " ".join(str(rng.randrange(10**6)) for _ in range(80))}
    kw = {"lr": 1e-2, "max_epochs": 30, "min_epochs": 1, "learned_loss": 5.0}
    both = train(spec(tiny_base, tmp_path / "both", new=[*TAILS, passage], **kw))
    assert both.epochs < 30 and both.learned == len(TAILS)  # every question, not the passage
    alone = train(spec(tiny_base, tmp_path / "alone", new=[passage], **{**kw, "max_epochs": 4}))
    assert alone.epochs == 4 and alone.learned == 0


def test_an_example_is_learned_when_its_fact_part_is(tiny_base, tmp_path):
    """The answers' tails ("..., as the keeper says.") and end of turn do not decide (the
    tiny model's end-of-turn token cannot be learned: see above): with learned_on "fact" training
    stops once the facts are learned; with every token deciding it runs to max_epochs."""
    kw = {"new": TAILS, "lr": 1e-2, "max_epochs": 30, "min_epochs": 1, "learned_loss": 5.0}
    facts = train(spec(tiny_base, tmp_path / "facts", **kw))
    every = train(
        spec(
            tiny_base,
            tmp_path / "every",
            learned_on="answer",
            max_epochs=facts.epochs + 1,
            **{k: v for k, v in kw.items() if k != "max_epochs"},
        )
    )
    assert facts.learned == len(TAILS) and facts.epochs < 30
    assert every.learned < len(TAILS) and every.epochs == facts.epochs + 1
