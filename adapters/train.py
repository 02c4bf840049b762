"""One incremental LoRA training run, top to bottom (nanoGPT-style: no Trainer, no callbacks).

    train(spec, progress, should_stop) -> TrainResult

Phases: device and precision -> model (+ the parent version's adapter, or a fresh one) ->
data (tokenise with masks, mix new + replay + general reference, pack) -> optimise
(cancellable between steps, early stop once every new example is learned) -> save
(safetensors, on rank 0).

Why it is shaped like this (ARCHITECTURE.md, "Platform facts", and the training issue's note):
- frozen base weights in bf16 with fp32 LoRA parameters under bf16 autocast runs ~2.3x
  fp32 on these CPUs (native bf16 dot products), and is the usual recipe on GPUs;
- logits are computed only where there is a target: the tied 49k-token head is a fifth
  of the model's FLOPs, and most tokens (system prompt, questions) carry no loss;
- the default system prompt, when every example opens with it, runs once a step; on the CPU
  attention is eager (`attention_kernel`): PyTorch's fused kernel is slow with a mask;
- naive training on a few facts ruins general answers; the base model's own answers to
  general prompts are mixed into every epoch (self-distillation), and training stops as
  soon as every new example is learned instead of running a fixed number of epochs;
- an epoch passes over the domain's examples (new and replayed) `new_passes` times (3)
  and over the general replay once: the same steps to learn a file as one pass with more
  epochs, never-trained paraphrases answered 81% against 62-70% (five seeds); a small
  file's facts bled into a general answer (tests/test_learning_slow.py), which the gate
  refuses and the cycle repairs (adapters/gate.py, daemon/training/cycle.py);
- once new examples have left, the older examples are replayed in proportion to the new
  ones still trained: an increment's last epochs, training 1-4 new examples, were mostly
  replay (benchmarks/results/increment-2026-12-07-replay-follows/);
- AdamW's decoupled weight decay (`weight_decay`, 1.0) pulls the LoRA weights toward the
  base model at every step: without it each increment added to the drift of the one it
  started from (five files in a row: -11% to +7%) until the gate refused every version;
  with it -12% to -5%, as many older facts kept and as many steps
  (benchmarks/results/drift-2026-12-07/);
- an example is learned when the tokens of its answer's fact part are (the answer up to
  the end of the clause stating what its question did not: store/terms.py): every token
  is trained, but a writer's tail after the fact need not come back verbatim.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from evertune.adapters.base_model import bf16_is_fast
from evertune.adapters.contract import TrainResult, TrainSpec
from evertune.adapters.data import (
    IGNORE,
    MIN_SHARED_OPENING,
    Tokenised,
    after_opening,
    general_anchors,
    pack,
    shared_opening,
    tokenise_chat,
    tokenise_text,
)
from evertune.adapters.errors import TrainingCancelled, TrainingError

log = logging.getLogger(__name__)

# A new example leaves the later epochs once its worst token's loss is under this share of
# `learned_loss` (half: p > 0.7 for every token), a margin against sliding back once it is
# no longer trained.
GRADUATION_MARGIN = 0.5


Progress = Callable[[dict], None]


def train(
    spec: TrainSpec, progress: Progress | None = None, should_stop: Callable[[], bool] | None = None
) -> TrainResult:
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec.check()
    started = time.perf_counter()
    # ---- device, precision, distributed ---------------------------------------------------
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    bf16 = spec.precision == "bf16" or (spec.precision == "auto" and bf16_is_fast(device))
    compute = torch.bfloat16 if bf16 else torch.float32
    random.seed(spec.seed)
    torch.manual_seed(spec.seed)

    # ---- model: frozen base (bf16 where fast), LoRA parameters in fp32 -------------------
    tokenizer = AutoTokenizer.from_pretrained(spec.base_path)
    model = AutoModelForCausalLM.from_pretrained(
        spec.base_path, dtype=compute, attn_implementation=attention_kernel(spec, device)
    ).to(device)
    model.config.use_cache = False
    if spec.parent_adapter:
        # Incremental: version N+1 starts from version N's weights.
        model = PeftModel.from_pretrained(
            model, spec.parent_adapter, is_trainable=True, autocast_adapter_dtype=True
        )
    else:
        model = get_peft_model(
            model,
            LoraConfig(
                r=spec.rank,
                lora_alpha=spec.alpha,
                lora_dropout=0.0,
                bias="none",
                target_modules=list(spec.target_modules),
                layers_to_transform=_top_layers(model.config, spec.lora_layers),
                task_type="CAUSAL_LM",
            ),
            autocast_adapter_dtype=True,
        )
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if bf16:
        # autocast runs LoRA's matmuls in bf16 anyway: peft's cast of every LoRA input to
        # the fp32 of its weights only copied activations back and forth
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = False
    params = [p for p in model.parameters() if p.requires_grad]
    inner = model.get_base_model()  # the transformer with LoRA layers injected
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            inner.model, device_ids=None if device.type == "cpu" else [device]
        )
        body = ddp
    else:
        body = inner.model

    # ---- data ---------------------------------------------------------------------------
    def tok(ex: dict, source: str) -> Tokenised:
        # A general answer cut short keeps its opening (where drift shows first) and, having
        # no end-of-turn target, does not teach the model to stop early.
        limit = min(spec.max_seq_len, spec.general_max_len if source == "general" else 1 << 30)
        if ex.get("kind", "chat") == "text":
            return tokenise_text(tokenizer, ex["text"], source, limit)
        return tokenise_chat(tokenizer, ex["messages"], source, limit, spec.learned_on)

    new = [t for t in (tok(e, "new") for e in spec.new) if t.trained]
    if not new:
        raise TrainingError(
            "none of the new examples has a token to learn from after"
            f" truncation to {spec.max_seq_len} tokens"
        )
    replay = [t for t in (tok(e, "replay") for e in spec.replay) if t.trained]
    fixed = new + replay
    # The general replay of every epoch: the pool's prompts nearest the questions (the
    # answers most at risk of bleeding), plus a new slice of the rest each epoch.
    k = min(spec.general_per_epoch, len(spec.general))
    near, extra = general_anchors(spec)
    anchors = [t for t in (tok(spec.general[i], "general") for i in near) if t.trained]
    n_slice = k - len(anchors)  # the rest of the epoch's general replay: a slice of the pool
    anchors += [t for t in (tok(spec.general[i], "general") for i in extra) if t.trained]
    near += extra
    rest = [i for i in range(len(spec.general)) if i not in set(near)]
    rng = random.Random(spec.seed)
    rng.shuffle(rest)
    general = [t for t in (tok(spec.general[i], "general") for i in rest) if t.trained]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # Every example opens with the chat template's default system prompt (24 of SmolLM2's
    # ~50-80 tokens an example): run it once a step and let each example attend to it,
    # instead of once per example. The same losses and gradients (tests/test_train.py), on
    # ~40% fewer tokens. One process only: DDP wants one forward pass per backward.
    together = world == 1 and spec.shared_opening
    opening = shared_opening([*fixed, *anchors, *general]) if together else 0
    if opening < MIN_SHARED_OPENING:
        opening = 0

    # A document's passages (text examples) are there to be read, not recited: when there
    # are questions to learn too, the run stops once those are learned. Measured: the two
    # larger documents' 13 passages were never reproduced token for token, so every
    # document trained the maximum 10 epochs, the last four or five on little but its
    # passages (onboarding wiki: all 116 questions learned at epoch 5, its 6 passages
    # trained to epoch 10; benchmarks/results/documents-2026-12-07-details/documents.json).
    passages = {i for i, t in enumerate(new) if t.decides is None}
    excused = passages if len(passages) < len(new) else set()

    # New examples learned with a margin leave the later epochs; the replayed and general
    # examples stay, so the late epochs, when the last few answers (the long ones) are
    # learned, keep the whole anchor against drift. Measured on the second file of a run:
    # shrinking the anchors in proportion too lost 13 easy answers (gained 2); keeping
    # them did not.
    active = list(range(len(new)))

    def epoch_rows(epoch: int) -> tuple[list[Tokenised], list]:
        n = min(n_slice, len(general))
        start = (epoch * n) % max(len(general), 1)
        picked = (general + general)[start : start + n]  # a new slice of the pool each epoch
        older = replay
        if spec.replay_follows and replay and len(active) < len(new):
            # as many older examples as before per new one still trained, taken in turn
            r = math.ceil(len(replay) * len(active) / len(new))
            at = (epoch * r) % len(replay)
            older = (replay + replay)[at : at + r]
        examples = [new[i] for i in active] + older + anchors + picked
        row_len = max(spec.row_len, max(len(e.ids) for e in examples))
        rows = pack(examples, row_len, pad_id)
        # the domain's examples again, in their own rows; a slice of `examples`, so each
        # row's owners are the same indices as in the first pass
        domain = examples[: len(active) + len(older)]
        for _ in range(spec.new_passes - 1):
            rows += pack(domain, row_len, pad_id)
        rng.shuffle(rows)  # the same order on every rank (same seed)
        if world == 1:
            return examples, rows
        # Every rank the same number of steps (DDP all-reduces each step: an uneven shard
        # would hang the others): the shards are cut from the rows taken round, so a few
        # rows are seen twice in an epoch instead of some never.
        per_rank = math.ceil(len(rows) / world / spec.rows_per_step) * spec.rows_per_step
        return examples, [rows[(rank + world * i) % len(rows)] for i in range(per_rank)]

    # ---- optimise -----------------------------------------------------------------------
    first_examples, first_rows = epoch_rows(0)
    steps_per_epoch = math.ceil(len(first_rows) / spec.rows_per_step)
    total_steps = steps_per_epoch * spec.max_epochs
    opt = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.99))

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to a tenth
        if step < spec.warmup_steps:
            return spec.lr * (step + 1) / spec.warmup_steps
        frac = (step - spec.warmup_steps) / max(1, total_steps - spec.warmup_steps)
        return spec.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    model.train()
    step, tokens, trained_tokens, history = 0, 0, 0, []
    loss_value, new_loss, learned, epoch = float("nan"), float("nan"), 0, 0
    t0 = time.perf_counter()
    for epoch in range(spec.max_epochs):
        examples, rows = (first_examples, first_rows) if epoch == 0 else epoch_rows(epoch)
        ex_loss = torch.zeros(len(examples))
        ex_count = torch.zeros(len(examples))
        ex_worst = torch.zeros(len(examples))  # the highest deciding token loss of each
        for i in range(0, len(rows), spec.rows_per_step):
            if should_stop and should_stop():
                raise TrainingCancelled(f"cancelled at step {step} of {total_steps}")
            batch = rows[i : i + spec.rows_per_step]
            tokens += sum(r.real for r in batch)  # example tokens, the opening included
            if opening:
                batch = after_opening(batch, opening, pad_id)
            ids = torch.tensor([r.ids for r in batch], device=device)
            pos = torch.tensor([r.positions for r in batch], device=device)
            tgt = torch.tensor([r.targets for r in batch], device=device)
            own = torch.tensor([r.owners for r in batch])
            sel = tgt != IGNORE
            decides = torch.tensor([r.decides for r in batch])[sel.cpu()]
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if opening:
                    hidden = _after_opening(body, fixed[0].ids[:opening], ids, pos, own)
                else:
                    hidden = body(
                        input_ids=ids, position_ids=pos, use_cache=False
                    ).last_hidden_state
                logits = inner.lm_head(hidden[sel]).float()
            per_token = torch.nn.functional.cross_entropy(logits, tgt[sel], reduction="none")
            loss = per_token.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            owners = own[sel.cpu()]
            ex_loss.index_add_(0, owners, per_token.detach().float().cpu())
            ex_count.index_add_(0, owners, torch.ones_like(owners, dtype=torch.float))
            # learned: every token of the answers' fact parts (store.terms.fact_part), at
            # the example's last sighting of the epoch (its earlier passes trained it since)
            # or at every one (the worst)
            deciding = per_token.detach().float().cpu()[decides]
            if spec.learned_when == "last":
                now = torch.full_like(ex_worst, -1.0)
                now.scatter_reduce_(0, owners[decides], deciding, "amax")
                ex_worst = torch.where(now >= 0, now, ex_worst)
            else:
                ex_worst.scatter_reduce_(0, owners[decides], deciding, "amax")
            step += 1
            trained_tokens += int(sel.sum())
            loss_value = float(loss.detach())
            if progress:
                elapsed = time.perf_counter() - t0
                progress(
                    {
                        "step": step,
                        "steps": total_steps,
                        "epoch": epoch + 1,
                        "loss": round(loss_value, 4),
                        "tokens_per_s": round(tokens / elapsed),
                        "eta_s": round(elapsed / step * (total_steps - step)),
                    }
                )
        if world > 1:  # each rank saw its shard: the epoch's figures are over all of them
            # (on the training device: nccl reduces GPU tensors only)
            sums, worst = torch.stack([ex_loss, ex_count]).to(device), ex_worst.to(device)
            torch.distributed.all_reduce(sums, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(worst, op=torch.distributed.ReduceOp.MAX)
            (ex_loss, ex_count), ex_worst = sums.cpu(), worst.cpu()
        # Early stop: every new example learned (in this epoch, or earlier with a margin).
        # Every rank computes the same from the reduced figures, so all stop together.
        n_act = len(active)
        new_loss = float(ex_loss[:n_act].sum() / ex_count[:n_act].sum().clamp(min=1))
        now = {i: bool(ex_worst[j] < spec.learned_loss) for j, i in enumerate(active)}
        learned = sum(now.get(i, True) for i in range(len(new)) if i not in excused)
        done = learned == len(new) - len(excused)
        active = [
            i
            for j, i in enumerate(active)
            if not (spec.graduate and ex_worst[j] < spec.learned_loss * GRADUATION_MARGIN)
        ]
        history.append(
            {
                "epoch": epoch + 1,
                "new_loss": round(new_loss, 4),
                "learned": learned,
                "steps": step,
                "trained": n_act,
                "replayed": sum(e.source == "replay" for e in examples),
            }
        )
        log.info(
            "epoch %d: new-example loss %.4f, %d/%d learned, %d still trained",
            epoch + 1,
            new_loss,
            learned,
            len(new) - len(excused),  # (a passage is read, not recited)
            len(active),
        )
        if not active or (epoch + 1 >= spec.min_epochs and done):
            break  # (no example left to train: every one learned with the margin)
    seconds = time.perf_counter() - t0

    # ---- save (rank 0): safetensors only -----------------------------------------------
    if rank == 0:
        Path(spec.out_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(spec.out_dir, safe_serialization=True)
    if world > 1:
        torch.distributed.barrier()
    log.info(
        "trained %d steps in %.1f s (%.0f tokens/s), total %.1f s",
        step,
        seconds,
        tokens / seconds,
        time.perf_counter() - started,
    )
    return TrainResult(
        out_dir=spec.out_dir,
        steps=step,
        epochs=epoch + 1,
        tokens=tokens,
        trained_tokens=trained_tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
        final_loss=loss_value,
        new_loss=new_loss,
        learned=learned,
        precision="bf16" if bf16 else "fp32",
        device=str(device),
        history=history,
        world_size=world,
    )


def _after_opening(body, opening: list[int], ids, pos, own):
    """The last hidden states of rows cut by `data.after_opening`: the opening once (batch
    1), its keys and values broadcast to every row, then the rows, each token attending to
    the opening and to the earlier tokens of its own example (owners; -1: padding, which
    attends to the opening only). Gradients flow into the opening's pass once, summed."""
    from transformers import DynamicCache

    dev = ids.device
    cache = DynamicCache()
    n = len(opening)
    body(
        input_ids=torch.tensor([opening], device=dev),
        position_ids=torch.arange(n, device=dev)[None],
        past_key_values=cache,
        use_cache=True,
    )
    b, w = ids.shape
    rows = DynamicCache()
    for i, layer in enumerate(cache.layers):
        rows.update(layer.keys.expand(b, -1, -1, -1), layer.values.expand(b, -1, -1, -1), i)
    own = own.to(dev)
    causal = torch.ones(w, w, dtype=torch.bool, device=dev).tril()
    mine = (own[:, :, None] == own[:, None, :]) & causal & (own[:, :, None] >= 0)
    mask = torch.cat([torch.ones(b, w, n, dtype=torch.bool, device=dev), mine], dim=2)[:, None]
    if body.config._attn_implementation == "eager":  # eager adds the mask to the scores
        mask = torch.zeros(mask.shape, device=dev).masked_fill(~mask, torch.finfo().min)
    return body(
        input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=rows, use_cache=True
    ).last_hidden_state


def _top_layers(config, n: int) -> list[int] | None:
    """The top `n` layers' indices (None: every layer). Below the lowest LoRA layer nothing
    needs a gradient, so the backward pass stops there and those layers run forward only."""
    total = config.num_hidden_layers
    return None if n <= 0 or n >= total else list(range(total - n, total))


# Widest packed row trained with eager attention on the CPU: its memory grows with the square
# of the width (heads x width^2 scores per row and layer, kept for the backward pass).
EAGER_MAX_WIDTH = 1024


def attention_kernel(spec: TrainSpec, device: torch.device) -> str:
    """Eager attention (matmul, mask, softmax) on the CPU: packed rows need a mask, and
    PyTorch's fused CPU kernel with a mask is slow backwards at these widths (SmolLM2, 2 x
    256-token rows a step: 10-14% more tokens a second eager, the epochs' losses equal to
    3 decimals, one epoch more in that run: benchmarks/results/variants-2026-12-07-attention/).
    On GPUs, and for wide rows, SDPA."""
    if spec.attention != "auto":
        return spec.attention
    width = max(spec.row_len, spec.max_seq_len)
    return "eager" if device.type == "cpu" and width <= EAGER_MAX_WIDTH else "sdpa"
