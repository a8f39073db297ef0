"""End-to-end test of the digits demo at a reduced setting, and of its CLI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("optax")
pytest.importorskip("matplotlib")

from ntkflow.__main__ import build_parser, main  # noqa: E402
from ntkflow._demo import (  # noqa: E402
    DemoConfig,
    MissingDependencyError,
    _require,
    max_gaps,
    report,
    run_demo,
)

# 64 training digits, 30 steps at a quarter of the maximal learning rate, width
# 512. Observed (float32 and float64 alike, the initialization is drawn in
# float32): predicted train/test accuracy within 0.016 (2 of 128 digits) of the
# network's, train/test loss within 2.1% of it, for both predictors; the
# tolerances leave a 3x margin.
ACCURACY_TOL = 0.06  # absolute
LOSS_RTOL = 0.06  # relative to the network's loss


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    png = tmp_path_factory.mktemp("demo") / "curves.png"
    config = DemoConfig(
        width=512,
        steps=30,
        lr_fraction=0.25,
        n_train=64,
        n_test=128,
        n_records=10,
        seed=1,
        output=str(png),
        progress=False,
    )
    return run_demo(config, log=None)


def test_predictions_follow_the_trained_network(result):
    assert result.steps[0] == 0 and result.steps[-1] == 30
    assert 0 < result.learning_rate == pytest.approx(0.25 * result.max_learning_rate)
    net = result.network
    # Training made progress.
    assert net.train_loss[-1] < 0.7 * net.train_loss[0]
    assert net.test_accuracy[-1] > 0.4
    assert "gradient_descent" in result.predictions
    for name, pred in result.predictions.items():
        for fld in ("train_loss", "test_loss"):
            gap = np.abs(getattr(pred, fld) - getattr(net, fld))
            assert np.all(gap <= LOSS_RTOL * getattr(net, fld)), (name, fld, gap)
        for fld in ("train_accuracy", "test_accuracy"):
            gap = np.abs(getattr(pred, fld) - getattr(net, fld))
            assert np.all(gap <= ACCURACY_TOL), (name, fld, gap)
        # Both start from the network's outputs at initialization.
        assert pred.test_loss[0] == pytest.approx(net.test_loss[0], rel=1e-5)


def test_report_and_png(result):
    text = report(result)
    assert "test accuracy" in text and "largest |network - prediction|" in text
    assert len(text.splitlines()) >= len(result.steps) + 3
    assert set(max_gaps(result)) == set(result.predictions)
    assert result.figure is not None
    with open(result.figure, "rb") as fh:
        data = fh.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    import matplotlib.image

    image = matplotlib.image.imread(result.figure)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_cli_help():
    proc = subprocess.run(
        [sys.executable, "-m", "ntkflow", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for flag in ("--width", "--steps", "--lr-fraction", "--lr", "--loss", "--momentum",
                 "--n-train", "--n-test", "--seed", "--output", "--no-progress"):
        assert flag in proc.stdout


def test_cli_parsing_and_errors(capsys):
    args = build_parser().parse_args(
        ["demo", "--lr", "0.5", "--loss", "mse", "--momentum", "0.9", "--no-progress"]
    )
    assert (args.lr, args.loss, args.momentum, args.no_progress) == (0.5, "mse", 0.9, True)
    for bad in (["demo", "--width", "0"], ["demo", "--momentum", "1.5"],
                ["demo", "--loss", "hinge"], ["demo", "--lr", "1", "--lr-fraction", "0.5"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(bad)
        assert exc.value.code == 2
    assert main(["demo", "--n-train", "1500", "--n-test", "500", "--no-progress"]) == 2
    assert "n_train + n_test" in capsys.readouterr().err


def test_config_validation_and_missing_dependency():
    with pytest.raises(ValueError, match="width"):
        DemoConfig(width=0)
    with pytest.raises(ValueError, match="loss"):
        DemoConfig(loss="hinge")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="momentum"):
        DemoConfig(momentum=1.0)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ntkflow\[demo\]'"):
        _require("ntkflow_no_such_module", "testing")
