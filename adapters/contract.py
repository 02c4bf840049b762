"""The training child's contract: what the daemon asks of it, written as RUN_DIR/spec.json
(`ChildSpec`: the training run, `TrainSpec`, and the gate's inputs, `EvalSpec`), read back by
`evertune.adapters.child`; and what the child answers (`ChildResult`: the run's figures,
`TrainResult`, the gate's verdict, `GateResult`, and the seconds each part took), its last
stdout event and RUN_DIR/result.json. Both sides go through `to_dict` / `from_dict`, which
refuse an unknown or a missing key: a misspelt key is an error, never a setting quietly
left at its default (a typo in "changed" would have turned off the stale-answer check)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evertune.adapters.errors import TrainingError
from evertune.adapters.gate import GateResult, GateThresholds

SPEC_NAME = "spec.json"
RESULT_NAME = "result.json"


class SpecError(TrainingError):
    """spec.json does not match the contract (names the part and the keys)."""


# vLLM serves LoRA on these projections only, with bias "none" and these ranks
# (ARCHITECTURE.md, "Platform facts").
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class TrainSpec:
    base_path: str
    out_dir: str
    new: list[dict]  # examples: {"kind": "chat", "messages": [...]} or {"kind": "text", ...}
    replay: list[dict] = field(default_factory=list)  # older examples of the domain
    general: list[dict] = field(default_factory=list)  # the base model's own answers
    parent_adapter: str | None = None
    rank: int = 16
    alpha: int = 32
    lr: float = 1e-3
    # AdamW's decoupled decay of the LoRA weights, towards the base model (0: none)
    weight_decay: float = 1.0
    max_epochs: int = 10
    min_epochs: int = 2
    # An example is learned when every one of its target tokens has a loss below this:
    # under ln 2 (0.69) each token is the greedy choice, so the answer is reproduced exactly.
    learned_loss: float = 0.69
    general_per_epoch: int = 24
    general_nearest: float = 0.5  # share of those that are the prompts nearest the new ones
    general_max_len: int = 80  # general examples are cut to this many tokens (no end token)
    row_len: int = 256  # 2 x 256 tokens a step: measured (benchmarks/learning.py), small
    rows_per_step: int = 2  # files of facts need enough optimiser steps per epoch
    max_seq_len: int = 512
    warmup_steps: int = 2
    seed: int = 0
    target_modules: tuple[str, ...] = TARGET_MODULES
    lora_layers: int = 0  # LoRA on the top N transformer layers only (0: all)
    precision: str = "auto"  # auto | bf16 | fp32
    shared_opening: bool = True  # run the examples' common opening once a step (see train)
    graduate: bool = True  # learned examples leave later epochs (see train)
    # once new examples have left, each epoch replays older examples in proportion to the
    # new ones still trained (the same share as at the start), a different slice each epoch
    replay_follows: bool = True
    # an example is learned when these tokens of its answers are: "fact" (their fact parts,
    # store.terms.fact_part, and the token after each) or "answer" (every token). Measured
    # (benchmarks/results/variants-2026-12-07/): a third choice, only the fact parts' new
    # words, let examples leave before their answers were reproduced (16 of 30 at lr 2e-3)
    learned_on: str = "fact"
    new_passes: int = 3  # the domain's examples this many times an epoch (the general once)
    # with several passes, an example is judged learned by its tokens at "every" sighting of
    # the epoch (the worst of them) or at its "last". Measured: "last" stopped a first file
    # an epoch sooner (benchmarks/results/variants-2026-12-07-last-sighting/) but over five
    # seeds in the daemon left 3 of 10 files unserved, paraphrases of second files 15-19 of
    # 30 (benchmarks/results/continual-2026-12-07-last-sighting/)
    learned_when: str = "every"
    # prompts whose nearest general prompts are replayed in every epoch besides the new
    # ones': a repaired candidate's bleeding general questions
    # (daemon/training/cycle.py, _repair_spec)
    anchor_prompts: list[str] = field(default_factory=list)
    # the nearest general prompts are those nearest the new and the replayed questions (an
    # increment's older names bleed too: file 1's parrot in 'Which animal says "meow"?')
    near_replayed: bool = True
    # the attention kernel: "auto" (eager on the CPU for rows up to EAGER_MAX_WIDTH tokens,
    # else PyTorch's SDPA), "eager" or "sdpa" (adapters/train.py `attention_kernel`)
    attention: str = "auto"

    def check(self) -> None:
        if self.rank not in VLLM_RANKS:
            raise TrainingError(
                f"LoRA rank {self.rank} cannot be served by vLLM; use one of"
                f" {', '.join(map(str, VLLM_RANKS))}"
            )
        bad = set(self.target_modules) - set(TARGET_MODULES)
        if bad:
            raise TrainingError(
                f"vLLM cannot serve LoRA on {sorted(bad)}; allowed: {', '.join(TARGET_MODULES)}"
            )
        if not self.new:
            raise TrainingError("no new examples to train on")
        if not self.weight_decay >= 0:
            raise TrainingError(f"weight_decay is 0 or more, not {self.weight_decay!r}")
        if self.learned_on not in ("fact", "answer"):
            raise TrainingError(f"learned_on is 'fact' or 'answer', not {self.learned_on!r}")
        if self.learned_when not in ("last", "every"):
            raise TrainingError(f"learned_when is 'last' or 'every', not {self.learned_when!r}")
        if self.new_passes < 1:
            raise TrainingError(f"new_passes is at least 1, not {self.new_passes}")
        if self.attention not in ("auto", "eager", "sdpa"):
            raise TrainingError(f"attention is 'auto', 'eager' or 'sdpa', not {self.attention!r}")


@dataclass(frozen=True)
class EvalSpec:
    """What the gate measures the candidate with (adapters/gate.py, adapters/child.py)."""

    # held-out general prompts with the base model's answers (Reference fields)
    general: list[dict]
    # held-out older examples of the domain: kept or forgotten?
    old: list[dict] = field(default_factory=list)
    # GateThresholds' fields; a missing one takes the gate's default
    gate: dict[str, float] = field(default_factory=dict)
    # the gate's greedy answers through this server (it serves the base model as `base`);
    # None: made by the model in the child
    vllm_url: str | None = None
    # what the candidate must beat: the live version (None: the base model, for version 1),
    # also when a rebuild trains from the base model
    live_adapter: str | None = None
    # {"prompt", "old"}: new answers that replace answers a version learned
    changed: list[dict] = field(default_factory=list)
    # {"question", "answer", ...}: held-out questions about the new documents
    doc_checks: list[dict] = field(default_factory=list)
    # where the base model's side of the gate is kept (None: the run folder's parent)
    cache_dir: str | None = None

    def thresholds(self) -> GateThresholds:
        return GateThresholds(**self.gate)


@dataclass(frozen=True)
class ChildSpec:
    train: TrainSpec
    eval: EvalSpec
    # only measure the base model's side of the gate (daemon/training/children.py warm_gate)
    warm: bool = False

    def save(self, run_dir: Path) -> None:
        """RUN_DIR/spec.json, which the child reads with `load`."""
        (run_dir / SPEC_NAME).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, run_dir: Path) -> ChildSpec:
        return cls.from_dict(json.loads((run_dir / SPEC_NAME).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "train": dataclasses.asdict(self.train),
            "eval": dataclasses.asdict(self.eval),
            "warm": self.warm,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChildSpec:
        # `to_dict` writes every field: one missing was lost on the way (or written by hand)
        top = _checked(cls, data, "spec", every=True)
        train = _checked(TrainSpec, top["train"], "spec train", every=True)
        train["target_modules"] = tuple(train["target_modules"])
        ev = _checked(EvalSpec, top["eval"], "spec eval", every=True)
        _checked(GateThresholds, ev["gate"], "spec eval.gate")  # a missing one: the default
        return cls(TrainSpec(**train), EvalSpec(**ev), bool(top["warm"]))


@dataclass
class TrainResult:
    """What one training run did (adapters/train.py)."""

    out_dir: str
    steps: int
    epochs: int
    tokens: int  # example tokens trained on (a shared opening counted in each example)
    trained_tokens: int  # tokens with a loss target
    seconds: float
    tokens_per_s: float
    final_loss: float
    new_loss: float  # last epoch's mean loss per target token on the new examples
    learned: int  # new examples under `learned_loss` at the end
    precision: str
    device: str
    history: list[dict] = field(default_factory=list)
    world_size: int = 1  # processes that trained it (torchrun), each on its shard of rows

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ChildResult:
    """The child's answer: the training run, the gate's verdict on it, and the seconds of
    each part ({"train_s", "evaluate_s"})."""

    train: TrainResult
    gate: GateResult
    timing: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"train": self.train.to_dict(), "gate": self.gate.to_dict(), "timing": self.timing}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChildResult:
        top = _checked(cls, data, "result", every=True)
        timing = top["timing"]
        if not isinstance(timing, dict) or set(timing) != {"train_s", "evaluate_s"}:
            raise SpecError(f"result timing: expected train_s and evaluate_s, got {timing!r}")
        return cls(
            TrainResult(**_checked(TrainResult, top["train"], "result train", every=True)),
            GateResult(**_checked(GateResult, top["gate"], "result gate", every=True)),
            dict(timing),
        )


def _checked(kind: type, data: Any, where: str, every: bool = False) -> dict[str, Any]:
    """`data` as the keyword arguments of dataclass `kind`: a dict with no key it lacks and
    every field it requires (`every`: every field, those with a default too)."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected an object, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(kind)}
    problems = []
    unknown = sorted(set(data) - set(known))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    missing = sorted(
        n
        for n, f in known.items()
        if n not in data
        and (
            every or (f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        )
    )
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    if problems:
        raise SpecError(f"{where}: {'; '.join(problems)}")
    return dict(data)
