"""Train CM3 (or any registered model via --model) and write metrics.json + epochs.csv.

python examples/train_cm3.py                                  # embedded synthetic data
python examples/train_cm3.py --data-root ../shared/data --dataset tiktok
CM3_DATA_ROOT=../shared/data python examples/train_cm3.py --dataset tiktok --seed 1000
"""

import sys

from cm3_pyg.cli import main

if __name__ == "__main__":
    sys.exit(main(default_model="cm3"))
