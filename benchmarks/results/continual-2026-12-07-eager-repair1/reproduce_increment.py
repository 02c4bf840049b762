"""Reproduce a refused increment of a kept continual.py home and print what it answers to
the held-out older questions (see NOTES.md beside it).

    PYTHONPATH=<a folder holding evertune> python reproduce_increment.py HOME OUT_DIR
"""

import json
import sys
from pathlib import Path

from evertune.adapters import evaluate as ev
from evertune.adapters.contract import TrainSpec
from evertune.adapters.gate import short_qa
from evertune.adapters.train import train

home, out = Path(sys.argv[1]), sys.argv[2]
saved = json.loads((home / "runs" / "000002" / "spec.json").read_text())
fields = {**saved["train"], "out_dir": out}
fields["target_modules"] = tuple(fields["target_modules"])
spec = TrainSpec(**fields)
result = train(spec)
print("trained", result.steps, result.epochs)
model, tok = ev.load(spec.base_path, spec.out_dir)
qa = short_qa(saved["eval"]["old"])
got = ev.greedy_answers_chat(model, tok, [list(p) for p, _ in qa], first_sentence=False)
for (prompt, expected), answer in zip(qa, got, strict=True):
    print(json.dumps({"q": prompt[-1]["content"], "expected": expected, "answer": answer}))
