"""Print how the offline subject similarity ranks a builtin comparison's rows against the exact scorers.

Usage: python scripts/similarity_check.py OUTPUT [PROMPT_TYPE]   (OUTPUT: an `sdtune compare` folder;
PROMPT_TYPE: one_factor by default)
"""

import sys

from sdtune.compare.similarity_check import report
from sdtune.errors import SdtuneError

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    try:
        print(report(*sys.argv[1:]))
    except SdtuneError as exc:
        sys.exit(f"error: {exc}")
