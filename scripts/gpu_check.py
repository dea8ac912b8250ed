"""Entry point of the GPU check: `scripts/gpu_check.sh --help` (pkm_lm.gpucheck.run).

A GPU node runs the source tree as it was copied there, without installing the package, so the
repository root goes on the path first.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pkm_lm.gpucheck.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
