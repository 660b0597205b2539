"""Training curves from a run's metrics.jsonl: python tools/plot_metrics.py RUN_DIR [--out DIR] [--smooth K]."""

import sys

from megatron_sayo.rl.plots import main

if __name__ == "__main__":
    sys.exit(main())
