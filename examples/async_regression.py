"""The asynchronous engine around your own loop: a regression model, your own data, your
own metric and your own update rule.

    mpiexec -n 4 python -m mpi4py examples/async_regression.py              # rank 0 server, rank 3 tester
    mpiexec -n 4 python -m mpi4py examples/async_regression.py --algo easgd  # a built-in rule instead

The data is y = sin(3 x1) + x2 x3 + noise on x in [-1, 1]^8, made from a seed on every
rank (each worker trains on its own shard); the model is a small MLP trained with AdamW on
the mean squared error; the tester reports the center's test MSE against the variance of
y (what predicting the mean scores). The rule is defined here, against the public rule
interface: elastic averaging whose center pull shrinks with the exchange's staleness.
"""

import argparse

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402
from torch import nn  # noqa: E402

import mpi_easgd  # first: it applies what MPI needs before it starts
from mpi_easgd.rules.asynchronous import Arrival, ElasticWorker, ServerRule  # noqa: E402


class StalenessAwareEASGD(ServerRule):
    """Elastic averaging whose center pull is alpha / (1 + staleness)."""

    worker_rule = ElasticWorker  # the worker's side: EASGD's
    settings = ("alpha",)

    def apply(self, center: torch.Tensor, incoming: torch.Tensor, arrival: Arrival | None = None):
        staleness = arrival.staleness if arrival is not None else 0
        return torch.lerp(center, incoming, self.alpha / (1 + staleness), out=incoming), center


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] + 0.05 * torch.randn(n, generator=g)
    return x, y.unsqueeze(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algo", default="staleness", help="staleness (the rule above), easgd, async-diloco...")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default="runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train_x, train_y = make_data(4096, seed=1)
    test_x, test_y = make_data(1024, seed=2)

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        mse = nn.functional.mse_loss(model(test_x), test_y).item()
        return {"test_mse": mse, "test_mse_of_the_mean": test_y.var(unbiased=False).item()}

    algo = StalenessAwareEASGD if args.algo == "staleness" else args.algo
    with mpi_easgd.AsyncTraining(MPI.COMM_WORLD, model, optimizer, algo=algo, tau=8, evaluate=evaluate,
                                 epochs=args.epochs, batch_size=32, samples_per_step=32, samples_per_epoch=4096,
                                 test_every=0.5, out=args.out, progress=False) as run:
        for epoch in run.epochs():
            shard = torch.arange(run.worker_index, len(train_x), run.num_workers)  # this worker's samples
            order = shard[torch.randperm(len(shard), generator=torch.Generator().manual_seed(epoch))]
            for batch in run.batches(order.split(32)):
                loss = nn.functional.mse_loss(model(train_x[batch]), train_y[batch])
                optimizer.zero_grad()
                loss.backward()
                if not run.step(loss):
                    break
    if run.summary is not None:  # on the tester
        print(f"test MSE {run.summary['final_metrics']['test_mse']:.4f} "
              f"(predicting the mean: {run.summary['final_metrics']['test_mse_of_the_mean']:.4f})", flush=True)


if __name__ == "__main__":
    main()
