"""The trainer: real-data smoke run, bitwise resume, Ctrl-C, damaged checkpoints, the
environment, the missing ``train`` extra, the first-run compile message and warm-up
(``--warmup``), and the curves."""

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

from numbabn.mnist import train as train_module
from numbabn._extras import MissingExtraError
from numbabn.mnist.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from numbabn.mnist import cli as cli_module
from numbabn.mnist.cli import main
from numbabn.mnist.train import COMPILE_MESSAGE, TrainConfig, Trainer
from numbabn.mnist import warmup as warmup_module
from numbabn.mnist.warmup import OTHER, kernel_groups

REPO = Path(__file__).resolve().parents[2]

FIX = "pip install 'numbabn[train]'"


def synthetic_data(n_train=40, n_test=30, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_train).astype(np.uint8),
            rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8), rng.integers(0, 10, n_test).astype(np.uint8))


@pytest.fixture
def fake_data_module(monkeypatch):
    """Make ``numbabn.mnist.data.load_mnist`` return small synthetic data."""
    module = types.ModuleType("numbabn.mnist.data")
    module.load_mnist = lambda data_dir=None, download=True: synthetic_data()
    monkeypatch.setitem(sys.modules, "numbabn.mnist.data", module)


def _final_state(trainer):
    return {**{f"m.{k}": v for k, v in trainer.model.state_dict().items()},
            **{f"o.{k}": v for k, v in trainer.optimizer.state_dict().items()}}


def _assert_same_run(a, b):
    sa, sb = _final_state(a), _final_state(b)
    assert sa.keys() == sb.keys()
    for key in sa:
        np.testing.assert_array_equal(sa[key], sb[key], err_msg=key)
    drop = ("epoch_seconds", "images_per_second", "eval_seconds")
    strip = [[{k: v for k, v in h.items() if k not in drop} for h in t.history] for t in (a, b)]
    assert strip[0] == strip[1]


@pytest.mark.slow  # trains on 4000 real MNIST images
def test_short_real_mnist_run(tmp_path, monkeypatch):
    # No --data-dir, no $NUMBABN_DATA and an empty cache: the MNIST shipped with numbabn.
    monkeypatch.delenv("NUMBABN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    out = tmp_path / "run"
    # 125 steps of batch 32 (with the cnn's dropout and shifts): 95.4% here, a clear margin.
    rc = main(["--limit-train", "4000", "--batch-size", "32",
               "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9
    assert metrics["n_train"] == 4000 and metrics["epochs_done"] == 1
    (record,) = metrics["history"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_seconds",
                "images_per_second"):
        assert np.isfinite(record[key]) and record[key] > 0, key
    assert record["test_accuracy"] == metrics["test_accuracy"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_checkpoint(out / "checkpoint.npz")[1]["epochs_done"] == 1


@pytest.mark.parametrize("config", [TrainConfig(model="cnn", batch_size=16),
                                    TrainConfig(model="mlp", batch_size=12, optimizer="sgd", lr=0.5)],
                         ids=["cnn-adam", "mlp-sgd"])
def test_resume_equals_uninterrupted_bitwise(tmp_path, config):
    data = synthetic_data()
    straight = Trainer(config, data, str(tmp_path / "a"), progress=False, log=lambda s: None)
    straight.run(3)
    first = Trainer(config, data, str(tmp_path / "b"), progress=False, log=lambda s: None)
    first.run(2)
    resumed = Trainer(config, data, str(tmp_path / "b"), progress=False, log=lambda s: None)
    resumed.resume()
    assert resumed.epochs_done == 2
    resumed.run(3)
    _assert_same_run(straight, resumed)


def test_ctrl_c_keeps_last_checkpoint_and_resume_finishes_the_run(tmp_path, monkeypatch, fake_data_module,
                                                                  capsys):
    args = ["--limit-train", "40", "--batch-size", "8", "--epochs", "3", "--out", str(tmp_path),
            "--no-progress"]
    real_step = train_module.cross_entropy
    calls = {"n": 0}

    def interrupt_in_second_epoch(logits, y):
        calls["n"] += 1
        if calls["n"] == 8:        # 5 batches per epoch: the 3rd batch of epoch 2
            raise KeyboardInterrupt
        return real_step(logits, y)

    monkeypatch.setattr(train_module, "cross_entropy", interrupt_in_second_epoch)
    assert main(args) == 130
    assert "last complete checkpoint (1 epoch)" in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "checkpoint.npz")[1]["epochs_done"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []

    monkeypatch.setattr(train_module, "cross_entropy", real_step)
    assert main(args + ["--resume"]) == 0
    straight = Trainer(TrainConfig(batch_size=8, limit_train=40), synthetic_data(), str(tmp_path / "ref"),
                       progress=False, log=lambda s: None)
    straight.run(3)
    resumed = Trainer(TrainConfig(batch_size=8, limit_train=40), synthetic_data(), str(tmp_path),
                      progress=False, log=lambda s: None)
    resumed.resume()
    _assert_same_run(straight, resumed)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3]


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.npz"
    save_checkpoint(path, {"w": np.arange(3.0)}, {"model": "x"})

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"w": np.zeros(3)}, {"model": "x"})
    monkeypatch.undo()
    arrays, meta = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]


@pytest.fixture
def saved_run(tmp_path):
    trainer = Trainer(TrainConfig(model="mlp", batch_size=10, optimizer="sgd", lr=0.1), synthetic_data(),
                      str(tmp_path), progress=False, log=lambda s: None)
    trainer.run(1)
    return trainer


def test_truncated_checkpoint_is_refused(saved_run):
    path = Path(saved_run.checkpoint_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        saved_run.resume()


def test_corrupted_checkpoint_is_refused(saved_run):
    path = Path(saved_run.checkpoint_path)
    raw = bytearray(path.read_bytes())
    arrays, _ = load_checkpoint(path)
    # Flip one byte inside an array's data (found by its bytes, so zip CRCs or our checksum must catch it).
    needle = arrays["model.1.weight"].tobytes()[:64]
    at = bytes(raw).index(needle) + 10
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        saved_run.resume()


def test_edited_array_fails_checksum(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.arange(4.0)}, {"model": "x"})
    with np.load(path) as z:
        entries = {k: z[k] for k in z.files}
    entries["w"][0] = 99.0                         # a well-formed file with other contents
    np.savez(path, **entries)
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)


def test_checkpoint_of_another_model_or_settings_is_refused(saved_run, tmp_path):
    other = Trainer(TrainConfig(model="cnn"), synthetic_data(), saved_run.out_dir, progress=False)
    with pytest.raises(CheckpointError, match="model: checkpoint 'mlp', this run 'cnn'"):
        other.resume()
    other_lr = Trainer(TrainConfig(model="mlp", batch_size=10, optimizer="sgd", lr=0.2), synthetic_data(),
                       saved_run.out_dir, progress=False)
    with pytest.raises(CheckpointError, match="config.lr: checkpoint 0.1, this run 0.2"):
        other_lr.resume()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        Trainer(TrainConfig(model="mlp"), synthetic_data(), str(tmp_path / "empty"), progress=False).resume()


def test_cli_errors_are_clear(tmp_path, fake_data_module, capsys):
    assert main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    assert "--device cuda" in capsys.readouterr().err
    assert main(["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.npz").write_bytes(b"not a zip file")
    assert main(["--resume", "--out", str(tmp_path / "bad")]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_console_script_module_runs(tmp_path, fake_data_module):
    assert main(["--model", "mlp", "--no-bn", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["config"]["batch_norm"] is False and metrics["config"]["optimizer"] == "sgd"
    assert os.path.getsize(tmp_path / "curves.png") > 1000


def test_model_defaults_are_resolved_into_the_config():
    cnn, mlp = TrainConfig(model="cnn"), TrainConfig(model="mlp")
    assert (cnn.lr_decay, cnn.dropout, cnn.shift) == (0.7, True, 2)
    assert (mlp.lr_decay, mlp.dropout, mlp.shift) == (1.0, False, 0)
    assert cnn.epoch_lr(0) == cnn.lr and np.isclose(cnn.epoch_lr(3), cnn.lr * 0.7 ** 3)
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        TrainConfig(model="resnet")


def test_learning_rate_decays_per_epoch_and_dropout_is_in_the_model(tmp_path):
    trainer = Trainer(TrainConfig(batch_size=8, limit_train=40, lr_decay=0.5), synthetic_data(),
                      str(tmp_path), progress=False, log=lambda s: None)
    assert [type(l).__name__ for l in trainer.model.layers].count("Dropout") == 2
    trainer.run(3)
    np.testing.assert_allclose([h["lr"] for h in trainer.history], [1e-3, 5e-4, 2.5e-4])
    no_drop = Trainer(TrainConfig(dropout=False), synthetic_data(), str(tmp_path / "b"), progress=False)
    assert "Dropout" not in [type(l).__name__ for l in no_drop.model.layers]


def test_random_shifts_move_each_image_with_zero_fill():
    rng = np.random.default_rng(3)
    images = rng.random((6, 1, 9, 7), dtype=np.float32) + 1.0  # no zeros inside an image
    before = images.copy()
    shifted = train_module.random_shifts(images, 2, np.random.default_rng(0))
    np.testing.assert_array_equal(images, before)
    assert shifted.shape == images.shape and shifted.dtype == images.dtype
    for src, out in zip(images[:, 0], shifted[:, 0]):
        # find the offset that reproduces `out` from `src` (each image has its own)
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = np.zeros_like(src)
                h, w = src.shape
                ref[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] = \
                    src[max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
                if np.array_equal(out, ref):
                    matches.append((dy, dx))
        assert len(matches) == 1
    assert np.array_equal(train_module.random_shifts(images, 0, np.random.default_rng(0)), images)


@pytest.mark.parametrize("flags, message", [
    (["--lr-decay", "0"], "--lr-decay must be in (0, 1]; got 0.0"),
    (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]; got 1.5"),
    (["--shift", "9"], "--shift must be between 0 and 8 pixels; got 9"),
    (["--shift", "-1"], "--shift must be between 0 and 8 pixels; got -1"),
])
def test_bad_schedule_and_augmentation_flags(tmp_path, fake_data_module, capsys, flags, message):
    assert main(flags + ["--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_prefer_passive_waiting_respects_the_user_and_a_started_pool(monkeypatch):
    from numbabn._cpu import runtime as threads

    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    assert threads.prefer_passive_waiting() is False
    assert os.environ["OMP_WAIT_POLICY"] == "active"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(threads, "threading_layer", lambda: "omp")  # pool already running
    assert threads.prefer_passive_waiting() is False
    assert "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.setattr(threads, "threading_layer", lambda: None)
    assert threads.prefer_passive_waiting() is True
    assert os.environ["OMP_WAIT_POLICY"] == "passive"


def test_cli_restarts_once_with_quiet_thread_pools(monkeypatch):
    calls = []
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "active")  # the user's choice is kept
    monkeypatch.setattr(sys, "argv", ["numbabn-mnist", "--epochs", "2"])
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((path, args, env)))
    monkeypatch.setattr(cli_module, "main", lambda: 0)
    with pytest.raises(SystemExit):
        cli_module.cli()
    ((path, args, env),) = calls
    assert path == sys.executable and args == [sys.executable, "-m", "numbabn.mnist.cli", "--epochs", "2"]
    assert env["OPENBLAS_THREAD_TIMEOUT"] == "4" and env["OMP_WAIT_POLICY"] == "active"

    calls.clear()
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "10")  # already set: no restart, runs main
    with pytest.raises(SystemExit) as exit_info:
        cli_module.cli()
    assert calls == [] and exit_info.value.code == 0
    assert os.environ["OMP_WAIT_POLICY"] == "active"

    # The restarted process (or a user who set only OPENBLAS_THREAD_TIMEOUT): the command
    # still asks for passive OpenMP waiting, as the trainer itself used to.
    from numbabn._cpu import runtime as threads

    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(threads, "threading_layer", lambda: None)  # Numba's pool not started yet
    seen = {}
    monkeypatch.setattr(cli_module, "main", lambda: seen.setdefault("policy", os.environ.get("OMP_WAIT_POLICY")))
    with pytest.raises(SystemExit):
        cli_module.cli()
    assert calls == [] and seen == {"policy": "passive"}


@pytest.fixture
def bare_environ(monkeypatch):
    """No thread-pool variables set and Numba's pool 'not started', so anything that
    wanted to set them would."""
    from numbabn._cpu import runtime as threads

    for name in ("OMP_WAIT_POLICY", "OPENBLAS_THREAD_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "threading_layer", lambda: None)


def test_trainer_and_main_leave_os_environ_unchanged(tmp_path, bare_environ, fake_data_module):
    before = dict(os.environ)
    trainer = Trainer(TrainConfig(model="mlp", batch_size=10), synthetic_data(), str(tmp_path / "a"),
                      progress=False, log=lambda s: None)
    assert dict(os.environ) == before
    trainer.run(1)
    assert dict(os.environ) == before
    assert main(["--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    assert dict(os.environ) == before


# --- the train extra (tqdm, matplotlib) ---------------------------------------------


@pytest.mark.parametrize("module", ["tqdm", "matplotlib"])
def test_cli_without_the_train_extra_names_the_fix(tmp_path, monkeypatch, fake_data_module, capsys, module):
    monkeypatch.setitem(sys.modules, module, None)  # "import tqdm" now raises ImportError
    assert main(["--model", "mlp", "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"needs {module}" in err and FIX in err
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written


def test_no_progress_needs_no_tqdm(tmp_path, monkeypatch, fake_data_module):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert main(["--model", "mlp", "--epochs", "1", "--out", str(tmp_path), "--no-progress"]) == 0


def test_trainer_without_the_train_extra_names_the_fix(tmp_path, monkeypatch):
    config = TrainConfig(model="mlp", batch_size=10)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    trainer = Trainer(config, synthetic_data(), str(tmp_path), progress=True, log=lambda s: None)
    with pytest.raises(MissingExtraError, match="progress bar needs tqdm") as info:
        trainer.run(1)
    assert FIX in str(info.value) and isinstance(info.value, ImportError)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match="curves needs matplotlib") as info:
        train_module.plot_curves([], str(tmp_path / "c.png"))
    assert FIX in str(info.value)


# --- the first-run compile message ---------------------------------------------------


@pytest.mark.parametrize("cached", [False, True], ids=["cold", "warm"])
def test_compile_message_and_warm_up_once_before_the_first_batch_on_a_cold_cache(tmp_path, monkeypatch,
                                                                                  cached):
    events = []
    monkeypatch.setattr(train_module, "kernels_cached", lambda sources: cached)
    real_forward = train_module.cross_entropy

    def count_batches(logits, y):
        events.append("batch")
        return real_forward(logits, y)

    monkeypatch.setattr(train_module, "cross_entropy", count_batches)
    trainer = Trainer(TrainConfig(model="mlp", batch_size=10), synthetic_data(), str(tmp_path),
                      progress=False, log=lambda line: events.append(line))
    trainer.run(2)
    messages = [e for e in events if e == COMPILE_MESSAGE]
    warm_up_lines = [e for e in events if e.startswith("kernels ready in")]
    if cached:
        assert messages == [] and warm_up_lines == []
    else:
        assert messages == [COMPILE_MESSAGE] and events[0] == COMPILE_MESSAGE
        assert len(warm_up_lines) == 1 and events.index(warm_up_lines[0]) < events.index("batch")


def test_kernels_cached_looks_for_fresh_numba_index_files(tmp_path, monkeypatch):
    from numba.core import config as numba_config

    monkeypatch.setattr(numba_config, "CACHE_DIR", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty user-wide cache
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    source = tmp_path / "pkg" / "kern.py"
    source.parent.mkdir()
    source.write_text("# kernels\n")
    os.utime(source, (1_000_000, 1_000_000))
    assert train_module.kernels_cached([]) is True
    assert train_module.kernels_cached([source]) is False  # a fresh clone: no index
    index = source.parent / "__pycache__" / "kern.fn-3.py311.nbi"
    index.parent.mkdir()
    index.write_bytes(b"")
    os.utime(index, (2_000_000, 2_000_000))
    assert train_module.kernels_cached([source]) is True
    (source.parent / "__pycache__" / "other.fn-3.py311.nbi").write_bytes(b"")
    os.utime(source, (3_000_000, 3_000_000))  # the source changed after: Numba recompiles
    assert train_module.kernels_cached([source]) is False

    store = tmp_path / "numba-cache"  # $NUMBA_CACHE_DIR: only that folder counts
    monkeypatch.setattr(numba_config, "CACHE_DIR", str(store))
    os.utime(source, (1_000_000, 1_000_000))
    assert train_module.kernels_cached([source]) is False
    folder = str(source.parent)
    sub = store / f"pkg_{hashlib.sha1(folder.encode()).hexdigest()}"
    sub.mkdir(parents=True)
    (sub / "kern.fn-3.py311.nbi").write_bytes(b"")
    assert train_module.kernels_cached([source]) is True


def test_a_run_leaves_the_cache_warm_for_the_next(tmp_path):
    # After one run has compiled (or loaded) its kernels, the check says warm: no message.
    config = TrainConfig(model="cnn", batch_size=8, limit_train=16)
    data = synthetic_data(n_train=16, n_test=8)
    Trainer(config, data, str(tmp_path / "a"), progress=False, log=lambda s: None).run(1)
    assert train_module.kernels_cached(train_module.kernel_sources(config))
    lines = []
    Trainer(config, data, str(tmp_path / "b"), progress=False, log=lines.append).run(1)
    assert COMPILE_MESSAGE not in lines


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_renorm_option_builds_batch_renorm_layers_and_trains(tmp_path, model):
    from numbabn.layers import BatchRenorm1d, BatchRenorm2d
    from numbabn.mnist.options import build_parser, config_from_args
    config = config_from_args(build_parser().parse_args(["--model", model, "--norm", "renorm",
                                                         "--batch-size", "8"]))
    assert config.norm == "renorm"
    trainer = Trainer(config, synthetic_data(), str(tmp_path), progress=False, log=lambda s: None)
    kinds = {type(layer) for layer in trainer.model.layers}
    assert kinds & {BatchRenorm1d, BatchRenorm2d}
    trainer.run(1)
    assert np.isfinite(trainer.history[0]["train_loss"])
    with pytest.raises(ValueError, match="unknown norm"):
        TrainConfig(model=model, norm="layer")
    with pytest.raises(ValueError, match="unknown norm"):
        train_module.build_model(model, np.random.default_rng(0), norm="layer")


def test_each_epoch_records_its_per_step_losses_and_accuracies(tmp_path):
    # 45 images in batches of 10: four full batches and one of 5.
    trainer = Trainer(TrainConfig(model="mlp", batch_size=10, limit_train=45), synthetic_data(n_train=45),
                      str(tmp_path), progress=False, log=lambda s: None)
    trainer.run(2)
    sizes = [10, 10, 10, 10, 5]
    for record in trainer.history:
        steps, accuracies = record["step_losses"], record["step_accuracies"]
        assert len(steps) == 5 and all(np.isfinite(steps))
        assert np.isclose(np.average(steps, weights=sizes), record["train_loss"], rtol=1e-12)
        correct = np.multiply(accuracies, sizes)  # whole images right in each batch
        np.testing.assert_allclose(correct, np.round(correct), atol=1e-9)
        assert np.isclose(np.average(accuracies, weights=sizes), record["train_accuracy"], rtol=1e-12)
    assert trainer.history[0]["step_losses"] != trainer.history[1]["step_losses"]
    saved = json.loads((tmp_path / "metrics.json").read_text())["history"]
    for key in ("step_losses", "step_accuracies"):
        assert [h[key] for h in saved] == [h[key] for h in trainer.history]


def test_smoothed_is_the_exponential_moving_average():
    rng = np.random.default_rng(3)
    values = rng.standard_normal(40)
    span = 7
    alpha = 2 / (span + 1)
    # closed form: (1 - a)^t v0 + sum_{k=1..t} a (1 - a)^(t - k) v_k
    expected = [(1 - alpha) ** t * values[0]
                + sum(alpha * (1 - alpha) ** (t - k) * values[k] for k in range(1, t + 1))
                for t in range(len(values))]
    np.testing.assert_allclose(train_module.smoothed(list(values), span), expected, rtol=1e-12)
    assert train_module.smoothed([], 5) == []


def _plotted(history, path):
    """The lines of each panel of ``plot_curves``' figure, by label: (x, y); and
    the panel's ``xlim``."""
    from matplotlib.figure import Figure

    panels = []
    real_savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        panels.extend({line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                       for line in ax.get_lines()} | {"xlim": ax.get_xlim()} for ax in fig.axes)
        return real_savefig(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Figure, "savefig", keep)
        train_module.plot_curves(history, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return panels


def test_curves_plot_per_step_figures_and_per_epoch_tests_even_for_one_epoch(tmp_path):
    pytest.importorskip("matplotlib")
    one_epoch = [{"epoch": 1, "train_loss": 1.4, "test_loss": 0.9, "train_accuracy": 0.6, "test_accuracy": 0.7,
                  "step_losses": [2.3, 1.5, 1.1, 0.9], "step_accuracies": [0.2, 0.5, 0.7, 0.8]}]
    loss, accuracy = _plotted(one_epoch, tmp_path / "one.png")
    for panel, steps, test in ((loss, [2.3, 1.5, 1.1, 0.9], 0.9), (accuracy, [0.2, 0.5, 0.7, 0.8], 0.7)):
        assert panel["train, per step"] == ([0.25, 0.5, 0.75, 1.0], steps)  # a curve, not a lonely point
        assert panel["train, moving average"][0] == [0.25, 0.5, 0.75, 1.0]
        assert panel["test, epoch"] == ([1], [test])
        assert panel["xlim"][0] == 0  # the axis starts at epoch 0

    two_epochs = [dict(one_epoch[0]), dict(one_epoch[0], epoch=2, test_loss=0.5)]
    loss, _ = _plotted(two_epochs, tmp_path / "two.png")
    assert loss["test, epoch"] == ([1, 2], [0.9, 0.5])
    assert len(loss["train, moving average"][0]) == 8

    older = [{k: v for k, v in h.items() if not k.startswith("step_")} for h in two_epochs]
    loss, accuracy = _plotted(older, tmp_path / "older.png")  # a checkpoint of an older run
    assert "train, per step" not in loss and accuracy["test, epoch"] == ([1, 2], [0.7, 0.7])


# --- the warm-up ----------------------------------------------------------------------


def test_batch_sizes_of_a_run():
    assert train_module.batch_sizes(45, 10, smallest=2) == [10, 5]
    assert train_module.batch_sizes(41, 10, smallest=2) == [10]  # a last batch of one is dropped
    assert train_module.batch_sizes(8, 10, smallest=2) == [8]
    assert train_module.batch_sizes(60000, 128, smallest=2) == [128, 96]
    assert train_module.batch_sizes(10001, 500, smallest=1) == [500, 1]
    assert train_module.batch_sizes(10000, 500, smallest=1) == [500]
    for n, size in ((45, 10), (41, 10), (8, 10), (130, 60)):
        real = {len(b) for b in train_module.epoch_batches(n, size, seed=0, epoch=0)}
        assert set(train_module.batch_sizes(n, size, smallest=2)) == real


def test_warm_up_leaves_the_run_bitwise_unchanged(tmp_path, monkeypatch):
    # The cnn draws dropout masks from the model's generator and shifts the images;
    # 40 images in batches of 16 give a last batch of 8, so the walk has two sizes.
    config = TrainConfig(model="cnn", batch_size=16)
    data = synthetic_data()
    lines = []
    warmed = Trainer(config, data, str(tmp_path / "warm"), progress=False, log=lines.append)
    rng_state = warmed.rng.bit_generator.state
    state = _final_state(warmed)
    monkeypatch.setattr(train_module, "kernels_cached", lambda sources: False)
    warmed._compile_if_cold()
    assert warmed.rng.bit_generator.state == rng_state
    for key, value in _final_state(warmed).items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)
    assert warmed.warm_batch_sizes() == ([16, 8], [30])
    groups = kernel_groups(warmed.model, warmed.optimizer)
    assert {"Conv2d forward", "BatchNorm2d train", "BatchNorm2d backward", "BatchNorm2d eval",
            "Dropout forward", "Conv2d backward", "Adam step"} <= set(groups)
    # The message, a line per group ("  <group>   <seconds> s"), the other sizes, the total.
    assert lines[0] == COMPILE_MESSAGE and lines[-1].startswith("kernels ready in")
    assert sorted(" ".join(line.split()[:-2]) for line in lines[1:-2]) == sorted(groups)
    assert " ".join(lines[-2].split()[:-2]) == OTHER
    warmed.run(2)

    monkeypatch.setattr(train_module, "kernels_cached", lambda sources: True)
    plain = Trainer(config, data, str(tmp_path / "plain"), progress=False, log=lambda s: None)
    plain.run(2)
    _assert_same_run(warmed, plain)


@pytest.mark.parametrize("helper", [False, True], ids=["one process", "helper process"])
def test_warm_up_in_one_or_two_processes_runs_every_group(tmp_path, helper):
    lines = []
    trainer = Trainer(TrainConfig(model="cnn", batch_size=16), synthetic_data(), str(tmp_path),
                      progress=False, log=lines.append)
    times = trainer.warm_up(helper=helper)
    groups = kernel_groups(trainer.model, trainer.optimizer)
    assert times.helper is helper and list(times.groups) == groups
    assert set(times.helped) <= {g for g in groups if g.endswith("backward")}
    assert helper or not times.helped
    assert lines[-1].startswith("kernels ready in") and ("two processes" in lines[-1]) is helper


def _fake_helper(script):
    """A stand-in for the helper process: ``script`` runs instead of the real one."""
    def start(model, images, first):
        proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return warmup_module._Helper(proc)
    return start


@pytest.mark.parametrize("script", [
    "import sys; sys.exit(1)",  # gone before it started anything
    "import sys\nfor i in range(20): print('start', i, flush=True)\nsys.exit(1)",  # died compiling
    "import sys\nfor i in range(20): print('start', i, flush=True)\n"
    "for i in range(20): print('done', i, 0.5, flush=True)\nsys.stdin.read()",  # claims all, exits on stop
    "import sys\nfor i in range(20): print('start', i, flush=True)\nsys.stdin.read()",  # hangs
], ids=["exits at once", "dies while compiling", "claims everything", "never finishes"])
def test_a_failing_or_lying_helper_changes_nothing_but_the_time(tmp_path, monkeypatch, script):
    # Every pass still runs in this process, and the run is the same bits.
    config = TrainConfig(model="mlp", batch_size=10)
    data = synthetic_data()
    monkeypatch.setattr(warmup_module._Helper, "start", staticmethod(_fake_helper(script)))
    monkeypatch.setattr(warmup_module._Helper, "WAIT_S", 0.2)
    monkeypatch.setattr(train_module, "kernels_cached", lambda sources: False)
    warmed = Trainer(config, data, str(tmp_path / "warm"), progress=False, log=lambda s: None)
    times = warmed.warm_up(helper=True)
    assert times.helper and list(times.groups) == kernel_groups(warmed.model, warmed.optimizer)
    warmed.run(1)
    monkeypatch.setattr(train_module, "kernels_cached", lambda sources: True)
    plain = Trainer(config, data, str(tmp_path / "plain"), progress=False, log=lambda s: None)
    plain.run(1)
    _assert_same_run(warmed, plain)


def test_warm_up_progress_bar_steps_once_per_group_naming_it(tmp_path, monkeypatch):
    calls = []

    class FakeBar:  # tqdm's calls as a list (a real bar skips frames within 0.1 s)
        def __init__(self, total, **kwargs):
            calls.append(("total", total))

        def set_description_str(self, text):
            calls.append(("desc", text))

        def update(self, n):
            calls.append(("update", n))

        def close(self):
            calls.append(("close",))

        @staticmethod
        @contextlib.contextmanager
        def external_write_mode():
            calls.append(("write",))
            yield

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeBar))
    lines = []
    trainer = Trainer(TrainConfig(model="mlp", batch_size=10), synthetic_data(), str(tmp_path),
                      progress=True, log=lines.append)
    times = trainer.warm_up()
    groups = kernel_groups(trainer.model, trainer.optimizer)
    assert list(times.groups) == groups
    if not times.helper:  # one process: the groups' times add up within the total
        assert times.total >= sum(times.groups.values()) + times.other
    assert calls[0] == ("total", len(groups)) and calls[-1] == ("close",)
    assert calls.count(("update", 1)) == len(groups) == calls.count(("write",))
    # One line per group, each as the bar steps, after the bar named the group.
    reported = [" ".join(line.split()[:-2]) for line in lines[:len(groups)]]
    assert sorted(reported) == sorted(groups)
    steps = [i for i, c in enumerate(calls) if c[0] == "update"]
    for group, step in zip(reported, steps):
        assert ("desc", f"compiling {group}") in calls[:step]
    assert lines[-1].startswith("kernels ready in")


def test_warmup_command_warms_both_models_and_writes_nothing(tmp_path, monkeypatch, fake_data_module, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--warmup", "--no-progress"]) == 0
    out = capsys.readouterr().out
    # 40 synthetic training images (one batch of each model's size) and 30 test images.
    for model in ("cnn", "mlp"):
        assert f"{model}: a training step on batches of 40 and an evaluation on batches of 30" in out
    assert out.count("kernels ready in") == 2 and "Conv2d backward" in out and "SGD step" in out
    assert list(tmp_path.iterdir()) == []  # no run folder, no checkpoint, no curves
    assert main(["--warmup", "--resume"]) == 2
    assert "leave out --distributed and --resume" in capsys.readouterr().err


# Counts Numba's real compilations (cache misses) while running the command.
_COUNT_COMPILES = textwrap.dedent("""
    import sys
    from numba.core import event

    compiled = []

    class Count(event.Listener):
        def on_start(self, ev):
            compiled.append(ev.data["dispatcher"].py_func.__qualname__)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Count())
    from numbabn.mnist.cli import main

    status = main(sys.argv[1:])
    print("numba compiled", len(compiled), sorted(set(compiled)))
    sys.exit(status)
""")


@pytest.mark.slow  # compiles the mlp's kernels into an empty cache
def test_warmup_command_fills_the_cache_and_the_run_compiles_nothing(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    options = ["--model", "mlp", "--limit-train", "100", "--no-progress"]

    def command(*args):
        return subprocess.run([sys.executable, "-c", _COUNT_COMPILES, *options, *args], cwd=work, env=env,
                              capture_output=True, text=True, timeout=600)

    warmup = command("--warmup")
    assert warmup.returncode == 0, warmup.stderr
    assert "mlp: a training step on batches of 60 and 40" in warmup.stdout
    assert "BatchNorm1d backward" in warmup.stdout and "kernels ready in" in warmup.stdout
    assert int(warmup.stdout.split("numba compiled ")[1].split()[0]) > 0
    assert list(work.iterdir()) == []  # no run folder

    run = command("--epochs", "1", "--out", str(tmp_path / "run"))
    assert run.returncode == 0, run.stderr
    assert "numba compiled 0 []" in run.stdout
    assert COMPILE_MESSAGE not in run.stdout  # the cache check sees it warm, too
    assert (tmp_path / "run" / "metrics.json").exists()
