"""Model registry: ``mlp``, ``lenet``, ``cifarnet`` (the seed's CIFAR-10 network),
``resnet20``, ``convmlp`` (a small CNN with a wide dense head, ~10 M parameters),
``charlm`` (a small causal transformer over bytes, for ``--task next-token``),
``torchvision:NAME`` for any torchvision model where torchvision imports, and a user's own
as ``package.module:factory`` (called as ``factory(shape, num_classes)``)."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn


class MLP(nn.Module):
    """Two-layer perceptron (flatten, 128 hidden units): for small inputs and quick checks."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU(),
                                 nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-5 (conv 6@5x5, conv 16@5x5, fc 120-84-classes): ~61 k parameters on MNIST."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        c, h, w = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        n = _flat_features(self.features, shape)
        self.classifier = nn.Sequential(
            nn.Linear(n, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CifarNet(nn.Module):
    """The seed's CIFAR-10 network: four conv5x5-BN-ReLU-maxpool blocks (64/128/256/512
    channels), then one linear layer (~4.3 M parameters)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        layers, c = [], shape[0]
        for out in (64, 128, 256, 512):
            layers += [nn.Conv2d(c, out, 5, padding=2), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
            c = out
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(_flat_features(self.features, shape), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 for 32x32 images (He et al. 2016, 3x3 blocks of 16/32/64 channels; ~0.27 M)."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        layers = [nn.Conv2d(shape[0], 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(_Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvMLP(nn.Module):
    """A small CNN (conv 16@3x3, conv 32@3x3, each with 2x2 max-pooling) behind a wide dense
    head (4096-256-classes): ~9.5 M parameters on 32x32 images, almost all of them (and
    most of the arithmetic) dense, so that a step moves many bytes for little arithmetic:
    the communication-bound case."""

    def __init__(self, shape: tuple[int, int, int], num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(shape[0], 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.classifier = nn.Sequential(
            nn.Linear(_flat_features(self.features, shape), 4096), nn.ReLU(),
            nn.Linear(4096, 256), nn.ReLU(), nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CharLM(nn.Module):
    """A small causal transformer language model over bytes (``--task next-token``): token
    and learned position embeddings, 2 pre-norm layers of 4 heads at width 128, a linear
    head over the vocabulary; ~0.43 M parameters for 256 symbols and 64 positions. Takes
    ``[batch, time]`` integer tokens, gives ``[batch, time, vocabulary]`` logits."""

    def __init__(self, shape: tuple[int, ...], num_classes: int, width: int = 128, layers: int = 2,
                 heads: int = 4) -> None:
        super().__init__()
        context = shape[0]
        self.embed = nn.Embedding(num_classes, width)
        self.position = nn.Parameter(torch.randn(context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        time = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(time, device=tokens.device)
        h = self.embed(tokens) + self.position[:time]
        return self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))


def _flat_features(features: nn.Module, shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        device = next(features.parameters()).device  # "meta" during validation
        return int(features(torch.zeros(1, *shape, device=device)).shape[1])


MODELS: dict[str, Callable[[tuple[int, int, int], int], nn.Module]] = {
    "mlp": MLP,
    "lenet": LeNet,
    "cifarnet": CifarNet,
    "resnet20": ResNet20,
    "convmlp": ConvMLP,
    "charlm": CharLM,
}


class ModelError(ValueError):
    """Unknown model name, or a torchvision model that cannot be built here."""


def import_torchvision():
    """Import torchvision, tolerating a build whose compiled ops do not match torch.

    A CUDA torchvision next to a CPU torch fails at import on ``torchvision::nms``; defining
    the missing operator schemas first lets its pure-Python models load (compiled ops such
    as nms still fail if called, which no model here does).
    """
    try:
        import torchvision
        return torchvision
    except ImportError as exc:
        raise ModelError(f"torchvision models need torchvision: pip install torchvision ({exc})") from None
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:
            pass  # already defined by the failed import
    import_torchvision._lib = lib  # the schemas live as long as the library object
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - report why, do not crash on an optional extra
        raise ModelError(f"torchvision is installed but does not import here: {exc}") from None
    return torchvision


def check_model_name(name: str) -> None:
    """Raise :class:`ModelError` for a name the registry does not know (a user's factory,
    ``package.module:factory``, must import and be callable)."""
    if name in MODELS or name.startswith("torchvision:"):
        return
    if ":" in name:
        user_factory(name)
        return
    raise ModelError(
        f"unknown model '{name}'; choose one of {', '.join(MODELS)}, torchvision:NAME "
        f"(e.g. torchvision:resnet18) or your own as package.module:factory"
    )


def user_factory(name: str):
    """The user's model factory ``package.module:factory``: called as ``factory(shape,
    num_classes)`` (``shape``: one sample's C, H, W), it returns an ``nn.Module``."""
    from mpi_easgd.registry import load_user_object

    factory = load_user_object(name, "--model", ModelError)
    if not callable(factory):
        raise ModelError(f"--model {name} is not callable: name a function or class called as "
                         f"factory(shape, num_classes) that returns a torch.nn.Module")
    return factory


def check_model(name: str, info, kind=None) -> None:
    """Build ``name`` for dataset ``info`` and run one sample through it; raise
    :class:`ModelError` if it cannot take this data or gives outputs of the wrong shape for
    the task ``kind`` (default: classification). A torchvision model is built on the meta
    device (no memory, no arithmetic: some are gigabytes); the registry's own small models
    and a user's on the CPU, in milliseconds, because torch's meta kernels import sympy on
    first use (1.8 s per rank at every start, measured). An HDF5 dataset's sample is zeros
    of one image's shape; a user's dataset gives its first training input."""
    from mpi_easgd.tasks import TASKS

    kind = kind or TASKS["classification"]
    shape, num_classes = tuple(info.shape), info.num_classes
    on_meta = name.startswith("torchvision:")
    with torch.device("meta" if on_meta else "cpu"):
        sample = torch.zeros(1, *shape) if info.datasets is None else \
            torch.as_tensor(info.datasets["train"][0][0]).unsqueeze(0)
        try:
            out = build_model(name, shape, num_classes).eval()(sample)
        except ModelError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # (a user's model fails in these too)
            first = str(exc).splitlines()[0]
            what = "images" if info.datasets is None else "inputs"
            raise ModelError(
                f"model {name} cannot take {what} of shape {shape} ({first}); "
                f"choose a model for this data (mlp takes any image)"
            ) from None
    expected = (1, *kind.expected_output(tuple(info.target_shape), num_classes))
    if tuple(out.shape) != expected:
        raise ModelError(f"model {name} gives outputs of shape {tuple(out.shape)}, not {expected} "
                         f"(--task {kind.name})")


def build_model(name: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """Build model ``name`` for images of ``shape`` (C, H, W) and ``num_classes`` classes."""
    check_model_name(name)
    if name in MODELS:
        return MODELS[name](shape, num_classes)
    if not name.startswith("torchvision:"):
        try:
            model = user_factory(name)(tuple(shape), num_classes)
        except Exception as exc:  # noqa: BLE001 - the user's factory failed: one line, no traceback
            raise ModelError(f"--model {name}: factory(shape={tuple(shape)}, num_classes={num_classes}) failed "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"--model {name} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    tv_name = name.split(":", 1)[1]
    tv = import_torchvision()
    try:
        factory = tv.models.get_model_builder(tv_name)
    except ValueError:
        raise ModelError(
            f"torchvision has no model '{tv_name}'; see torchvision.models.list_models()"
        ) from None
    if shape[0] != 3:
        raise ModelError(f"torchvision models expect 3-channel images; this dataset has {shape[0]}")
    return factory(weights=None, num_classes=num_classes)
