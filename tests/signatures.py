"""Version signatures that no batch, dtype or mixture can fake: adapters whose only effect
is to make the model answer one marker word, over and over, whatever it is asked.

    maker = SignatureMaker(base_path)
    maker.write(folder, k)           # version k's adapter: answers maker.marker(k) repeated
    maker.version_of(answer)         # k, or None; maker.versions_in(answer) for a mixture

How: one rank of LoRA on the `o_proj` of one late layer. Its input (the attention output)
has a common direction m at every position of every prompt (the attention sink), so
A = m / |m| gives A.x > 0 everywhere, and B = c * d_k adds c * (A.x) * d_k to the residual
stream, where d_k is the marker's head row with the final norm's weights divided out. With
c large enough the residual is dominated by d_k, the final norm turns it into the marker's
head row, and the head gives token k by a margin of many logits at every step, in fp32 and
in bf16, alone or in a batch (markers that cannot win that way are skipped). The layer
and c are chosen and checked on the base model at construction (the logit margin at every
answer step, fp32 and, where the CPU has it, bf16), and the benchmark checks them again on
vLLM, alone and in a full batch.

A request whose generation crossed a switch from version j to k answers j's marker, then
k's: `versions_in` gives (j, k), never a third version.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

_WORDS = """
apple river green piano tiger lemon castle rocket silver garden pencil window orange monkey
island candle dragon button forest planet bridge camera winter rabbit coffee jungle basket
shadow violin marble pepper helmet anchor thunder carpet spider tunnel falcon cactus magnet
lizard rubber saddle
"""
WORDS = tuple(_WORDS.split())
PROMPTS = (
    "Which version are you?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many days are in a week?",
    "Explain photosynthesis in one sentence.",
    "hi",
)
RANK = 16
MARGIN = 8.0  # the marker's logit above every other token's, at every calibration position


class SignatureMaker:
    def __init__(self, base: Path | str, rank: int = RANK, count: int = len(WORDS)):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.torch = torch
        self.rank = rank
        self.tok = AutoTokenizer.from_pretrained(base)
        base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        self.head = base_model.get_output_embeddings().weight.detach()
        self._directions: dict[int, torch.Tensor] = {}
        self.norm = base_model.model.norm.weight.detach()
        self.markers = self._single_tokens(count)
        self.layer, self.direction, self.floor = self._pick_layer(base_model)
        self.model = get_peft_model(
            base_model,
            LoraConfig(
                r=rank,
                lora_alpha=rank,  # scaling 1: B A is the delta itself
                target_modules=["o_proj"],
                layers_to_transform=[self.layer],
                bias="none",
                init_lora_weights=False,
            ),
        )
        self.scale = self._pick_scale()

    # ---- the markers ---------------------------------------------------------------------
    def _single_tokens(self, count: int) -> list[tuple[str, int]]:
        """(word, token id) for words that are one token with a leading space and win the
        head by a margin when the residual stream is their direction (see `_direction`)."""
        out = []
        for w in WORDS:
            ids = self.tok.encode(" " + w, add_special_tokens=False)
            if len(ids) == 1 and self._lead(ids[0]) >= 1.25 * MARGIN:
                out.append((w, ids[0]))
                if len(out) == count:
                    break
        if len(out) < count:
            raise ValueError(f"only {len(out)} usable one-token marker words; need {count}")
        return out[:count]

    def _direction(self, token: int) -> torch.Tensor:  # noqa: F821
        """The residual direction whose final norm makes the head pick `token` by the widest
        margin: the head rows share a large common part (on its own, 'apple' gives
        ' strugg'), so v starts as the token's row less the mean row and is pushed away
        from the strongest rival for a few steps; the norm's weights are then divided out."""
        if token not in self._directions:
            h = self.head
            v = h[token] - h.mean(0)
            for _ in range(60):
                logits = h @ (v / v.norm())
                logits[token] = -math.inf
                rival = int(logits.argmax())
                v = v + 0.1 * v.norm() * (h[token] - h[rival]) / (h[token] - h[rival]).norm()
            d = (v / v.norm()) / self.norm
            self._directions[token] = d / d.norm()
        return self._directions[token]

    def _lead(self, token: int) -> float:
        """The token's logit above the next one's when the residual is its direction alone."""
        d = self._direction(token)
        logits = self.head @ (self.norm * d * math.sqrt(d.numel()))
        top = logits.topk(2)
        return float(top.values[0] - top.values[1]) if int(top.indices[0]) == token else -1.0

    def marker(self, k: int) -> str:
        return self.markers[(k - 1) % len(self.markers)][0]

    def versions_in(self, answer: str | None) -> tuple[int, ...]:
        """The versions whose markers make up `answer`, in order of appearance (one for a
        clean answer, two for a request that crossed a switch); () if any word is not a
        marker (then it is no version's answer)."""
        words = re.findall(r"[A-Za-z]+", (answer or "").lower())
        index = {w: i + 1 for i, (w, _) in enumerate(self.markers)}
        if not words or any(w not in index for w in words):
            return ()
        out: list[int] = []
        for w in words:
            if not out or out[-1] != index[w]:
                out.append(index[w])
        return tuple(out)

    def version_of(self, answer: str | None) -> int | None:
        found = self.versions_in(answer)
        return found[0] if len(found) == 1 else None

    # ---- calibration ---------------------------------------------------------------------
    def _inputs(self, model, layer: int) -> torch.Tensor:  # noqa: F821
        """The o_proj inputs of `layer` at the positions that choose the answer's tokens (the
        prompt's last one, then each answer word's) for the calibration prompts, each
        answered by a few marker words."""
        torch = self.torch
        captured = []
        module = model.model.layers[layer].self_attn.o_proj
        handle = module.register_forward_hook(lambda m, args, out: captured.append(args[0][0]))
        try:
            with torch.no_grad():
                for i, p in enumerate(PROMPTS):
                    text = self.tok.apply_chat_template(
                        [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                    )
                    start = len(self.tok(text, add_special_tokens=False)["input_ids"])
                    words = " ".join(self.markers[(i + j) % len(self.markers)][0] for j in range(3))
                    ids = self.tok(
                        text + " " + words, return_tensors="pt", add_special_tokens=False
                    )
                    model(**ids)
                    captured[-1] = captured[-1][start - 1 :]
        finally:
            handle.remove()
        return torch.cat(captured)

    def _pick_layer(self, model) -> tuple[int, torch.Tensor, float]:  # noqa: F821
        """The late layer whose o_proj inputs share a direction most clearly: the worst
        cosine of any answer position with the mean is the largest."""
        best = None
        n = model.config.num_hidden_layers
        for layer in range(n - 1, max(-1, n - 6), -1):
            x = self._inputs(model, layer)
            m = x.mean(0)
            m = m / m.norm()
            cos = (x @ m) / x.norm(dim=1)
            worst = float(cos.min())
            if best is None or worst > best[2]:
                best = (layer, m, worst)
        if best[2] <= 0:
            raise ValueError(f"no late layer has a common input direction (best cosine {best[2]})")
        return best

    def _pick_scale(self) -> float:
        """The smallest c (x4 steps) at which markers win every calibration step by MARGIN
        logits, in fp32 and bf16; then twice that."""
        from evertune.adapters.base_model import cpu_has_native_bf16

        # bf16 as vLLM serves it where the CPU has it (emulated elsewhere: minutes, unused)
        kinds = (False, True) if cpu_has_native_bf16() else (False,)
        x = self._inputs(self.model.get_base_model(), self.layer)
        c = 1.0 / max(float(x.norm(dim=1).median()) * self.floor, 1e-6)
        for _ in range(12):
            if all(
                self._margin(k, c, bf16) >= MARGIN
                for k in (1, 2, len(self.markers))
                for bf16 in kinds
            ):
                return 2 * c
            c *= 4
        raise ValueError("no scale makes the markers win by a margin")

    def _set(self, k: int, c: float) -> None:
        torch = self.torch
        _, token = self.markers[(k - 1) % len(self.markers)]
        with torch.no_grad():
            for name, w in self.model.named_parameters():
                if "lora_A" in name:
                    w.zero_()
                    w[0].copy_(self.direction)
                elif "lora_B" in name:
                    w.zero_()
                    w[:, 0].copy_(self._direction(token) * c)

    def _margin(self, k: int, c: float, bf16: bool) -> float:
        """The marker's smallest lead over the next token, over the calibration positions
        after the generation prompt (greedy steps of the answer)."""
        torch = self.torch
        self._set(k, c)
        _, token = self.markers[(k - 1) % len(self.markers)]
        worst = math.inf
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for p in PROMPTS:
                text = self.tok.apply_chat_template(
                    [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
                )
                start = len(self.tok(text, add_special_tokens=False)["input_ids"])
                ids = self.tok(
                    text + " " + " ".join([self.marker(k)] * 4),
                    return_tensors="pt",
                    add_special_tokens=False,
                )
                logits = self.model(**ids).logits[0, start - 1 :].float()
                others = logits.clone()
                others[:, token] = -math.inf
                worst = min(worst, float((logits[:, token] - others.max(1).values).min()))
        return worst

    # ---- output --------------------------------------------------------------------------
    def write(self, folder: Path, k: int) -> None:
        """Version k's adapter (a peft folder vLLM loads): answers marker(k) repeated."""
        self._set(k, self.scale)
        shutil.rmtree(folder, ignore_errors=True)
        self.model.save_pretrained(folder)

    def describe(self) -> str:
        return (
            f"o_proj of layer {self.layer}, input cosine with the common direction >="
            f" {self.floor:.2f}, scale {self.scale:.3g}, {len(self.markers)} markers"
        )
