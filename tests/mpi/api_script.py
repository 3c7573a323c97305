"""A user's script around AsyncTraining: a classifier trained in a loop of its own, every
setting from the command line (``--key value``). The launched tests run it as a script
(LeNet on mnist5k); tests/mpi/spmd_runs.py calls :func:`train` on sub-communicators."""

import sys

import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402

import mpi_easgd  # first: it applies what MPI needs before it starts
from mpi_easgd.data import ShardLoader, read_info, resolve_dataset  # noqa: E402
from mpi_easgd.models import build_model  # noqa: E402
from mpi_easgd.runtime.loop import evaluate  # noqa: E402


def train(comm, dataset: str = "mnist5k", model_name: str = "lenet", lr: float = 0.05, momentum: float = 0.9,
          **settings) -> dict | None:
    """One run on ``comm``; the summary on the tester, None elsewhere."""
    info = read_info(resolve_dataset(dataset))
    torch.manual_seed(0)
    model = build_model(model_name, info.shape, info.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0)
    test = ShardLoader(info, "test", batch_size=500, shuffle=False, even=False)

    def accuracy(model):
        loss, correct, count = evaluate(model, test.epoch(0), torch.device("cpu"))
        return {"test_loss": loss / count, "test_accuracy": correct / count}

    with mpi_easgd.AsyncTraining(comm, model, optimizer, evaluate=accuracy, model_name=model_name, dataset=dataset,
                                 samples_per_step=32, samples_per_epoch=info.sizes["train"], progress=False,
                                 **settings) as run:
        loader = ShardLoader(info, "train", max(run.worker_index, 0), run.num_workers, batch_size=32, seed=0)
        for epoch in run.epochs():
            for x, y in run.batches(loader.epoch(epoch)):
                loss = torch.nn.functional.cross_entropy(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                if not run.step(loss):
                    break
    return run.summary


def number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


if __name__ == "__main__":
    torch.set_num_threads(1)
    flags = zip(sys.argv[1::2], sys.argv[2::2])
    train(MPI.COMM_WORLD, **{k.lstrip("-").replace("-", "_"): number(v) for k, v in flags})
