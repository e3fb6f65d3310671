"""SEA's inner CLUB loop: the stacked, hand-differentiated version against the plain one.

    python -m benchmarks.sea_club                     # TikTok's shapes: 2 x [6710, 32]
    python -m benchmarks.sea_club --rows 1000 --repeats 3

Both sides start from the same CLUB weights and run ``--steps`` inner Adam steps per
repeat, alternating, in one process. The plain side is the textbook form: autograd of
the Gaussian log-likelihood summed over the modality pairs, and the per-tensor Adam.
The printed ratio is ours over plain (median seconds), with the final NLLs of both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from cm3_pyg.models.sea import CLUB
from cm3_pyg.nn.optim import make_adam
from cm3_pyg.training.memory import retain_freed_memory


def plain_nll(club: CLUB, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    mu, logvar = club.mu(x), club.logvar(x)
    return (0.5 * ((mu - y) ** 2 / logvar.exp() + logvar)).sum(1).mean()


def run(
    rows: int, dim: int, pairs: int, steps: int, repeats: int, hidden: int = 16
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    samples = [
        (torch.randn(rows, dim, generator=gen), torch.randn(rows, dim, generator=gen))
        for _ in range(pairs)
    ]
    ours, plain = CLUB(dim, dim, hidden), CLUB(dim, dim, hidden)
    plain.load_state_dict(ours.state_dict())
    opt_ours = make_adam(ours.parameters(), lr=1e-4)
    opt_plain = torch.optim.Adam(plain.parameters(), lr=1e-4)
    x = torch.cat([a for a, _ in samples])
    y = torch.cat([b for _, b in samples])
    weight = torch.full((rows * pairs,), 1.0 / rows)

    def step_ours() -> torch.Tensor:
        loss = ours.learning_loss(x, y, weight)
        opt_ours.zero_grad(set_to_none=True)
        loss.backward()
        opt_ours.step()
        return loss

    def step_plain() -> torch.Tensor:
        loss = sum(plain_nll(plain, a, b) for a, b in samples)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt_plain.step()
        return loss  # type: ignore[return-value]

    times: dict[str, list[float]] = {"ours": [], "plain": []}
    last: dict[str, float] = {}
    for _ in range(repeats):
        for name, step in (("plain", step_plain), ("ours", step_ours)):
            start = time.perf_counter()
            for _ in range(steps):
                loss = step()
            times[name].append(time.perf_counter() - start)
            last[name] = float(loss.detach())
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    out["ratio"] = out["ours_s"] / out["plain_s"]
    out.update({f"{k}_final_nll": v for k, v in last.items()})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=6710, help="rows per modality pair")
    parser.add_argument("--dim", type=int, default=32, help="CLUB sample width")
    parser.add_argument("--pairs", type=int, default=2, help="modality pairs")
    parser.add_argument("--steps", type=int, default=50, help="inner steps per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retain_freed_memory()  # as the training CLIs do
    result = run(args.rows, args.dim, args.pairs, args.steps, args.repeats)
    print(
        f"{args.pairs} x [{args.rows}, {args.dim}], {args.steps} steps, "
        f"{torch.get_num_threads()} threads: plain {result['plain_s']:.4f} s, "
        f"ours {result['ours_s']:.4f} s, ratio {result['ratio']:.3f} "
        f"(final NLL {result['plain_final_nll']:.6f} vs {result['ours_final_nll']:.6f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
