"""Fault injection: the real daemon SIGKILLed at random moments, restarted, and checked; and
hostile conditions it must survive running, report, and recover from without losing data.

    python benchmarks/faults.py [--trials 36] [--seed 0] [--phases a,b] [--out DIR] [--keep]

The trials, their checks and these options are tests/fault_trials.py (the suite runs the
same trials, fewer of them: tests/test_faults.py); this is its command line. Benchmarks
import from tests/, never the other way (ARCHITECTURE.md, "Layering").
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fault_trials import main

if __name__ == "__main__":
    sys.exit(main())
