"""Compare models over grids: select on validation Recall@20, report test mean ± std.

python examples/compare_models.py --models bprmf,lightgcn --seeds 999,1000 --budget 2 --epochs 5
python examples/compare_models.py --data-root ../shared/data --dataset tiktok \
    --models cm3,lirdrec,sea --seeds 999,1000,1001 --budget 4 --out runs/compare-tiktok

The same command as ``cm3-pyg compare`` (cm3_pyg.cli.compare); the logic lives in
cm3_pyg.experiments.compare.
"""

import sys

from cm3_pyg.cli.compare import main

if __name__ == "__main__":
    sys.exit(main())
