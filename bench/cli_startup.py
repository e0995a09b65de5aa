"""Start-up time of the `hf-chts` command (issue 13 item 9: `hf-chts --help` in under 1 s).

Prints one table: median wall time of `python -c pass` (the interpreter alone),
`hf-chts --help`, `import hf_chts` and, for scale, `import torch` and
`import transformers`, each measured side by side in this run (5 repeats).

    python bench/cli_startup.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -c pass": ["-c", "pass"],
    "hf-chts --help": ["-m", "hf_chts.cli", "--help"],
    "import hf_chts": ["-c", "import hf_chts"],
    "import torch": ["-c", "import torch"],
    "import transformers": ["-c", "import transformers"],
}


def wall_time(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    medians = {}
    for _ in range(args.repeats):  # interleaved: every command sees the same machine load
        for name, command in COMMANDS.items():
            medians.setdefault(name, []).append(wall_time(command))
    medians = {name: statistics.median(times) for name, times in medians.items()}
    print(f"{'command':<22} {'median s':>9} {'x python':>9}")
    for name, seconds in medians.items():
        print(f"{name:<22} {seconds:>9.3f} {seconds / medians['python -c pass']:>9.1f}")
    goal = medians["hf-chts --help"] < 1.0
    print(f"goal hf-chts --help < 1 s: {'met' if goal else 'NOT met'}")
    return medians


if __name__ == "__main__":
    main()
