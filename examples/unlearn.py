"""Forget users, train edges, items or one modality of items in a trained run (MMRecUn).

python examples/train_cm3.py --model lightgcn --out runs/synthetic-lightgcn
printf '3\n17\n' > users.txt
python examples/unlearn.py --run runs/synthetic-lightgcn --forget-users users.txt \
    --gold --finetune --out runs/synthetic-lightgcn-unlearned

Writes an unlearned run (loadable with cm3_pyg.load_run) and unlearn.json; see
cm3_pyg.cli.unlearn for the request file format (the same command as cm3-pyg unlearn).
"""

import sys

from cm3_pyg.cli.unlearn import main

if __name__ == "__main__":
    sys.exit(main())
