"""The config file's sections of learning: [train] (how a version is trained) and [gate]
(when it is promoted), in the form of daemon/config_sections.py (`key`: default, line of
documentation, bounds). Each hands the training child its part of the contract
(adapters/contract.py): `spec_fields`, `gate_fields`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from evertune.adapters.gate import GateThresholds
from evertune.daemon.config_sections import key

GATE = GateThresholds()


@dataclass(frozen=True)
class TrainConfig:
    rank: int = key(
        16, "LoRA rank (vLLM serves 1, 8, 16, 32, 64, 128, 256, 320, 512).", min=1, max=512
    )
    alpha: int = key(32, "LoRA alpha (the update is scaled by alpha / rank).", min=1, max=4096)
    lr: float = key(
        1e-3,
        "Peak learning rate (linear warm-up, cosine decay). Tried: 2e-3 learned a first file"
        " in fewer steps, but its increments on a second file were refused for lost easy"
        " answers; 3e-3 drifted past the tolerance on the first.",
        min=0.0,
        max=1.0,
    )
    increment_lr_scale: float = key(
        0.5,
        "An increment (a version trained from its parent) learns at lr times this. Measured"
        " over five seeds of a second file (benchmarks/results/increment-2026-12-07-lr/):"
        " at the full lr the increments forgot 2, 2, 0, 1, 1 of 7 held-out older answers"
        " (terse numbers and codes overwritten by the new file's), at half 1, 0, 0, 0, 1;"
        " through the daemon no increment of five needed a repair (four did), each in a few"
        " more steps (benchmarks/results/continual-2026-12-07-gentle-increments/).",
        min=0.0,
        max=100.0,
    )
    weight_decay: float = key(
        1.0,
        "AdamW's decoupled decay of the LoRA weights, a pull of every version toward the base"
        " model. Without it drift built up file after file (-11%, -2%, -3%, +2%, +7% over five"
        " files) until increments were refused; with 1.0, -12%, -5%, -19%, -1%, -5%"
        " (benchmarks/results/drift-2026-12-07/).",
        min=0.0,
        max=100.0,
    )
    max_epochs: int = key(10, "Most passes over the new examples.", min=1, max=1000)
    min_epochs: int = key(2, "Fewest passes before stopping early.", min=1, max=1000)
    learned_loss: float = key(
        0.69,
        "Stop once every token of every new answer's fact part (up to the end of the clause"
        " stating what its question did not, and the token after) has a loss below this"
        " (ln 2: each is the greedy choice, so the facts are reproduced exactly).",
        min=0.0,
        max=100.0,
    )
    general_per_epoch: int = key(
        24,
        "General reference examples (the base model's own answers) mixed into each epoch.",
        min=0,
        max=100_000,
    )
    general_when_drifting: int = key(
        48,
        "General examples per epoch instead when the live version's drift is within"
        " drifting_margin of gate.drift_tolerance. Drift is measured against the base model"
        " and grows version after version (measured: -16%, -5%, +11% over three files at"
        " 24); retrained with 48, the third was at -15%, for 1.8x its training time.",
        min=0,
        max=100_000,
    )
    drifting_margin: float = key(
        0.2,
        "See general_when_drifting: with gate.drift_tolerance 0.10, from a live drift of -10%.",
        min=0.0,
        max=100.0,
    )
    general_nearest: float = key(
        0.5,
        "Share of those that are the general prompts nearest the new questions (the answers"
        " most at risk of bleeding: measured, 'capital of Veloria' bled into 'capital of"
        " Italy').",
        min=0.0,
        max=1.0,
    )
    general_max_len: int = key(
        80,
        "General examples are cut to this many tokens: their opening is where drift shows.",
        min=16,
        max=65_536,
    )
    lora_layers: int = key(
        0,
        "LoRA on the top N transformer layers only (0: all). Below them the backward pass"
        " stops (top 15 of SmolLM2's 30: 1.35x faster), but measured, new facts then bled"
        " into general answers ('capital of Italy' -> a trained fictional capital).",
        min=0,
        max=10_000,
    )
    near_replayed: bool = key(
        True,
        "The general prompts replayed for being nearest the new questions are those nearest"
        " the replayed older ones too: an increment also bleeds older names (measured: file"
        " 1's parrot in 'Which animal says \"meow\"?' after file 2 trained).",
    )
    new_passes: int = key(
        3,
        "Passes over the domain's examples (new and replayed) in each epoch; the general"
        " replay once. Measured over 5 seeds, 3 passes answered 81% of never-trained"
        " paraphrases against 62-70% with 1 (increments take more steps). A trained name"
        " that bleeds into a general answer (more likely with more passes) is refused by"
        " the gate (gate.max_bleed) and repaired (train.consolidate).",
        min=1,
        max=100,
    )
    graduate: bool = key(
        True,
        "A new example learned with a margin (every fact-part token under half of"
        " learned_loss) leaves"
        " the later epochs (the replayed and general examples stay).",
    )
    consolidate: bool = key(
        True,
        "When a version (an increment, or a domain's first) learned the new data but the"
        " gate refused it for damage (drift, older or easy answers, new names in general"
        " answers), repair it once: train on from where it stopped with its held-out older"
        " examples replayed, more general replay and the general prompts nearest its"
        " bleeding answers (bounded by the new data; `train --from-base` rebuilds on every"
        " example).",
    )
    replay_ratio: float = key(
        2.0,
        "Older examples of the domain replayed, per new example (one phrasing of every"
        " older answer before a second of any): a cycle's cost follows the new data, not"
        " the domain's size. Measured on six files (benchmarks/results/"
        "continual-2026-12-08-six-files-replay2/): at 2, 6 of 6 files served, one after a"
        " repair, 60/60 facts known after the last; at 1, 4 of 6, 58/60.",
        min=0.0,
        max=100.0,
    )
    replay_min: int = key(
        8, "Replay at least this many older examples when there are some.", min=0, max=1_000_000
    )
    row_len: int = key(
        256, "Tokens per packed row (longer examples get a row of their own).", min=32, max=65_536
    )
    rows_per_step: int = key(2, "Packed rows per optimiser step.", min=1, max=4096)
    max_seq_len: int = key(
        512, "Longer examples are truncated to this many tokens.", min=16, max=65_536
    )
    seed: int = key(
        0, "Seed of data order, replay sampling and initialisation.", min=0, max=2**31 - 1
    )
    precision: str = key(
        "auto", "auto: bf16 where the hardware has it, else fp32.", choices=("auto", "bf16", "fp32")
    )
    cpu_priority: str = key(
        "pause",
        "How background children (training, preparing the base model) share the CPU with the"
        " embedded vLLM server: pause (the server pauses them while a client's request is in"
        " flight, at most 10 s at a time, so answers come first), normal, or idle"
        " (SCHED_IDLE; under steady traffic it starves: vLLM's worker busy-polls its queue"
        " for a second after every decoding step). On a GPU machine, where training does"
        " not share the server's cores, normal trains faster under traffic.",
        choices=("pause", "normal", "idle"),
    )
    launcher: str = key(
        "",
        "How the training child is started: empty for this Python, or"
        ' e.g. "torchrun --nproc-per-node 4" for several GPUs.',
    )

    def spec_fields(self, increment: bool = False) -> dict:
        """The TrainSpec fields of this section; an `increment` (a version trained from its
        parent's adapter, and its repair) at lr times `increment_lr_scale`."""
        skip = {
            "replay_ratio",
            "increment_lr_scale",
            "replay_min",
            "launcher",
            "cpu_priority",
            "consolidate",
            "general_when_drifting",
            "drifting_margin",
        }
        fields = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in skip
        }
        if increment:
            fields["lr"] = self.lr * self.increment_lr_scale
        return fields


@dataclass(frozen=True)
class GateConfig:
    # Defaults are the gate's own (measured, see evertune.adapters.gate.GateThresholds).
    min_learned: float = key(
        GATE.min_learned,
        "Share of new short answers the candidate must reproduce.",
        min=0.0,
        max=1.0,
    )
    max_stale: float = key(
        GATE.max_stale,
        "Of the new answers that replace an answer a version learned, the share the candidate"
        " may still answer the old way.",
        min=0.0,
        max=1.0,
    )
    old_tolerance: float = key(
        GATE.old_tolerance,
        "Allowed rise of the loss on held-out older examples against the live version.",
        min=0.0,
        max=100.0,
    )
    drift_tolerance: float = key(
        GATE.drift_tolerance,
        "Allowed rise of the loss on the base model's own general answers against the base model.",
        min=0.0,
        max=100.0,
    )
    easy_alpha: float = key(
        GATE.easy_alpha,
        "Refuse when the candidate is worse than the base model at the easy general questions"
        " with this significance (paired exact test on the answers that changed).",
        min=0.0,
        max=1.0,
    )
    max_bleed: int = key(
        GATE.max_bleed,
        "Easy general answers the candidate may give that state a name or number only the"
        " domain's examples have, new or older (one the base model's general answers never"
        " use); above it the version is refused: the domain's facts bleed into answers to"
        " other questions.",
        min=0,
        max=100_000,
    )
    old_holdout: int = key(
        16, "Older examples held out of training to check forgetting.", min=0, max=100_000
    )
    min_doc_answered: float = key(
        GATE.min_doc_answered,
        "Of the held-out questions about the documents a version learned (one per statement,"
        " never trained on), the share it must answer with the statement; below it the"
        " version is refused, not called learned.",
        min=0.0,
        max=1.0,
    )
    doc_checks: int = key(
        40,
        "Held-out questions about the new documents asked by the gate, at most.",
        min=0,
        max=100_000,
    )

    def gate_fields(self) -> dict:
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("old_holdout", "doc_checks")
        }
