"""Every kernel microbenchmark in one go (GPU only; each script exits cleanly without CUDA).

    python profiling/run_all.py [--quick]     -> profiling/results/<bench>_<device>.json
"""

import subprocess
import sys
from pathlib import Path

BENCHES = ["bench_tree_attention.py", "bench_rejection.py"]


def main():
    here = Path(__file__).parent
    extra = sys.argv[1:]
    failed = []
    for b in BENCHES:
        print(f"== {b}", flush=True)
        if subprocess.run([sys.executable, str(here / b), *extra]).returncode:
            failed.append(b)
    if failed:
        sys.exit(f"failed: {failed}")


if __name__ == "__main__":
    main()
