"""`evertune export`: a version's adapter copied out, or merged into its base model as a
plain Hugging Face folder that answers as the base model with the adapter (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evertune.adapters import registry
from evertune.daemon.cli import main
from evertune.store import versions
from evertune.store.db import open_db
from evertune.store.layout import HomeLayout

QUESTION = [{"role": "user", "content": "Which version are you?"}]


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_base) -> Path:
    """A home whose domain `legal` has a live version: a random LoRA on the tiny model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from evertune.adapters.contract import TARGET_MODULES

    home = tmp_path / "home"
    monkeypatch.setenv("EVERTUNE_HOME", str(home))
    monkeypatch.delenv("EVERTUNE_CONFIG", raising=False)
    layout = HomeLayout(home)
    layout.create()
    db = open_db(layout.db_path)
    v = registry.begin(db, layout.adapters, "legal", None, None)
    staging = registry.staging_dir(layout.adapters, "legal", v.number)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_base),
        LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGET_MODULES), bias="none"),
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    model.save_pretrained(staging)
    registry.publish(v, staging, {"train": {"base_path": str(tiny_base)}})
    registry.promote(db, versions.set_state(db, v, "candidate"))
    db.close()
    return home


def logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids if isinstance(ids, torch.Tensor) else ids["input_ids"]).logits


def test_export_copies_the_live_adapter_as_it_is(home, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["export", "legal", "--out", str(out)]) == 0
    version = home / "adapters" / "legal" / "v0001"
    for name in ("adapter_model.safetensors", "adapter_config.json", "meta.json"):
        assert (out / name).read_bytes() == (version / name).read_bytes()
    assert "the adapter of legal v0001" in capsys.readouterr().out


def test_a_merged_export_answers_as_the_base_model_with_the_adapter(home, tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", "legal", "--version", "v0001", "--out", str(out), "--merged"]) == 0

    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(out)  # the chat template travels with it
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(home / "adapters" / "legal" / "v0001")).eval()
    want, got = logits(adapted, tok), logits(merged, tok)
    with torch.no_grad():
        plain = logits(AutoModelForCausalLM.from_pretrained(tiny_base).eval(), tok)
    assert (want - plain).abs().max() > 0.1  # the adapter changes the answer...
    assert torch.allclose(got, want, atol=1e-3)  # ...and the merged model is the same
    assert got[0, -1].argmax() == want[0, -1].argmax()


def test_export_refuses_a_folder_that_has_files_and_a_version_that_does_not_exist(
    home, tmp_path, capsys
):
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["export", "legal", "--out", str(full)]) == 1
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert (full / "keep.txt").read_text() == "mine"
    assert main(["export", "legal", "--version", "v0009", "--out", str(tmp_path / "x")]) == 1
    assert "legal has no version v0009 (versions: v0001)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
