"""python -m lora_kernels.cli (what `check` re-runs itself with, and torchrun -m uses)."""
import sys

from . import main

sys.exit(main())
