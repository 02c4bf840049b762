"""Measuring a model: per-token loss on chats, greedy answers, and the gate's metrics.

All functions take a loaded model (a peft model whose adapter can be switched off to get
the base, see `adapter_off`) and run without gradients, in bf16 where that is fast.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from evertune.adapters.data import (
    IGNORE,
    MIN_SHARED_OPENING,
    Tokenised,
    pack,
    shared_opening,
    tokenise_chat,
)


def load(base_path: str, adapter: str | None = None, device: str | None = None):
    """(model, tokenizer) for evaluation; `adapter` None gives the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evertune.adapters.base_model import bf16_is_fast

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if bf16_is_fast(dev) else torch.float32
    tok = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype).to(dev)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tok


@contextlib.contextmanager
def adapter_off(model) -> Iterator[None]:
    """The base model's behaviour from a peft model (no-op for a plain model)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        yield


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def mean_loss(model, tokenizer, chats: Sequence[Sequence[dict]], max_len: int = 1024) -> float:
    """Mean loss per target token over all chats (token-weighted), each cut to `max_len`."""
    return scores(model, tokenizer, chats, max_len).mean_loss


# Logit gap between the answer's token and the runner-up at which a teacher-forced argmax is
# trusted to be what greedy decoding on the served weights picks too. The served numerics
# differ from this process's (vLLM's kernels, another bf16 reduction order). Measured on
# SmolLM2 in bf16, the base model teacher-forced on vLLM's own greedy answers to the 190
# held-out general prompts: where the two first differ, vLLM's token trailed this process's
# argmax by 0 (a tie: bf16 logits are coarse) to 0.31 in 116 of 122 answers; the other six
# (0.9-6.1) were texts that tokenise differently from how they were generated. Below the
# gap the answer is generated.
GREEDY_MARGIN = 0.5


@dataclass
class Scores:
    """Per chat, from one teacher-forced pass: its summed loss over its target tokens, how
    many targets it has, how many of its first targets greedy decoding reproduces (each
    the argmax by at least `GREEDY_MARGIN`), and whether `max_len` cut it."""

    sums: torch.Tensor
    counts: torch.Tensor
    agreed: list[int]
    truncated: list[bool]

    @property
    def mean_loss(self) -> float:
        return float(self.sums.sum() / self.counts.sum().clamp(min=1))

    def greedy(self, i: int, targets: int | None = None) -> bool:
        """Chat i's first `targets` target tokens (None: all of them, its answers and their
        end-of-turn markers) are what greedy decoding produces: verified by the forward pass
        as speculative decoding verifies a draft, no generation needed."""
        n = int(self.counts[i])
        if targets is None or targets >= n:
            return self.agreed[i] >= n and not self.truncated[i]
        return self.agreed[i] >= targets


def scores(
    model,
    tokenizer,
    chats: Sequence[Sequence[dict]],
    max_len: int = 1024,
    margin: float = GREEDY_MARGIN,
) -> Scores:
    sums, counts, agreed, truncated = _loss_sums(model, tokenizer, chats, max_len, margin=margin)
    return Scores(sums, counts, agreed, truncated)


@torch.inference_mode()
def _loss_sums(
    model,
    tokenizer,
    chats: Sequence[Sequence[dict]],
    max_len: int = 1024,
    row_len: int = 256,
    rows_per_batch: int = 8,
    margin: float = GREEDY_MARGIN,
) -> tuple[torch.Tensor, torch.Tensor, list[int], list[bool]]:
    """Per chat: the summed loss over its target tokens, how many there are, how many of
    the first ones are the argmax by `margin` (see `Scores`), and whether it was cut.

    Chats that all open the same way (the chat template's default system prompt: 24 of
    the ~70 tokens of a general reference example) run that opening once and continue
    from its KV cache; measured on SmolLM2 (190 held-out general examples, bf16): 11.7 s
    instead of 18.3 s, the loss equal to 0.1%. Otherwise short rows are packed: attention
    is computed over the whole row with a block-diagonal mask, so 1024-token rows of
    80-token examples spent most of it on masked blocks."""
    toks = [tokenise_chat(tokenizer, c, "eval", max_len) for c in chats]
    sums = torch.zeros(len(toks))
    counts = torch.zeros(len(toks))
    seen = [0] * len(toks)
    agreed = [-1] * len(toks)  # -1: no disagreement yet
    truncated = [len(t.ids) >= max_len for t in toks]
    if not toks:
        return sums, counts, [], []
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    shared = shared_opening(toks)
    if shared >= MIN_SHARED_OPENING:
        batches = _after_prefix(lm, toks, shared, tokenizer.pad_token_id or 0, rows_per_batch * 2)
    else:
        longest = max(len(t.ids) for t in toks)
        batches = _packed(
            lm, pack(toks, max(row_len, longest), tokenizer.pad_token_id or 0), rows_per_batch
        )
    for hidden, tgt, own in batches:
        sel = tgt != IGNORE
        logits = lm.lm_head(hidden[sel]).float()
        target = tgt[sel]
        loss = torch.nn.functional.cross_entropy(logits, target, reduction="none").cpu()
        top = logits.topk(2, dim=-1)
        ok = (top.indices[:, 0] == target) & (top.values[:, 0] - top.values[:, 1] >= margin)
        owners = own[sel.cpu()]
        sums.index_add_(0, owners, loss)
        counts.index_add_(0, owners, torch.ones_like(loss))
        # each chat's targets arrive in order within one row: the first that is not
        # confirmed ends its agreed prefix
        for o, good in zip(owners.tolist(), ok.cpu().tolist(), strict=True):
            if not good and agreed[o] < 0:
                agreed[o] = seen[o]
            seen[o] += 1
    agreed = [seen[i] if a < 0 else a for i, a in enumerate(agreed)]
    return sums, counts, agreed, truncated


def _packed(lm, rows: list, rows_per_batch: int):
    dev = lm.device
    for i in range(0, len(rows), rows_per_batch):
        batch = rows[i : i + rows_per_batch]
        ids = torch.tensor([r.ids for r in batch], device=dev)
        pos = torch.tensor([r.positions for r in batch], device=dev)
        tgt = torch.tensor([r.targets for r in batch], device=dev)
        own = torch.tensor([r.owners for r in batch])
        yield lm.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state, tgt, own


def _after_prefix(lm, toks: Sequence[Tokenised], shared: int, pad_id: int, batch: int):
    """The shared opening once (batch 1), then the rest of each example, longest first,
    right-padded (padding comes after every real token, so causal attention never sees
    it), continuing from the opening's keys and values broadcast over the batch.

    Training's packed rows with a mask (`train._after_opening`) give the same losses but
    were measured 20% slower here without gradients (10.8 s against 9.0 s for a merged
    candidate on the 190 held-out general prompts): no mask, no packing, one opening for
    every batch."""
    from transformers import DynamicCache

    dev = lm.device
    opening = DynamicCache()
    lm.model(input_ids=torch.tensor([toks[0].ids[:shared]], device=dev), past_key_values=opening)
    kv = [(layer.keys, layer.values) for layer in opening.layers]
    order = sorted(range(len(toks)), key=lambda i: -len(toks[i].ids))
    for i in range(0, len(order), batch):
        members = order[i : i + batch]
        width = len(toks[members[0]].ids) - shared
        ids = torch.full((len(members), width), pad_id)
        tgt = torch.full((len(members), width), IGNORE)
        for r, j in enumerate(members):
            rest = toks[j].ids[shared:]
            ids[r, : len(rest)] = torch.tensor(rest)
            tgt[r, : len(rest)] = torch.tensor(toks[j].targets[shared:])
        cache = DynamicCache()
        for layer, (k, v) in enumerate(kv):
            cache.update(
                k.expand(len(members), -1, -1, -1), v.expand(len(members), -1, -1, -1), layer
            )
        pos = torch.arange(shared, shared + width).expand(len(members), -1)
        hidden = lm.model(
            input_ids=ids.to(dev), position_ids=pos.to(dev), past_key_values=cache
        ).last_hidden_state
        own = torch.tensor(members).unsqueeze(1).expand(-1, width)
        yield hidden, tgt.to(dev), own


def greedy_answers(model, tokenizer, questions: Sequence[str], **kw) -> list[str]:
    """Greedy answers to single user questions (the template's default system prompt)."""
    return greedy_answers_chat(
        model, tokenizer, [[{"role": "user", "content": q}] for q in questions], **kw
    )


SENTENCE_ENDS = (". ", "\n", "? ", "! ")  # vLLM takes at most 4 stop strings


@torch.inference_mode()
def greedy_answers_chat(
    model,
    tokenizer,
    prompts: Sequence[Sequence[dict]],
    max_new_tokens: int = 48,
    batch: int = 32,
    first_sentence: bool = False,
) -> list[str]:
    """Greedy continuations of conversations that end before an assistant turn.

    `first_sentence`: each answer stops after its first sentence (what a reader takes as
    the answer; a keyword deep in a ramble is chance), and the batch stops when every
    answer has, instead of running all to `max_new_tokens`."""
    stop = {"stop_strings": list(SENTENCE_ENDS), "tokenizer": tokenizer} if first_sentence else {}
    dev = device_of(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out = []
    try:
        for i in range(0, len(prompts), batch):
            chats = [
                tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True)
                for m in prompts[i : i + batch]
            ]
            enc = tokenizer(chats, return_tensors="pt", padding=True, add_special_tokens=False).to(
                dev
            )
            gen = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                **stop,
            )
            out += tokenizer.batch_decode(
                gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
            )
    finally:
        tokenizer.padding_side = side
    return [(first_sentence_of(a) if first_sentence else a).strip() for a in out]


def first_sentence_of(text: str) -> str:
    """Up to the end of the first sentence (the whole text when it has one sentence)."""
    text = text.strip()
    ends = [i for i in (text.find(e) for e in SENTENCE_ENDS) if i >= 0]
    return text[: min(ends) + 1] if ends else text


def normalise_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!")


def matches(answer: str, expected: str) -> bool:
    """An answer matches a short expected answer when it contains it (normalised)."""
    return normalise_text(expected) in normalise_text(answer)
