"""numbabn.distributed under ``mpiexec -n 2``: sync batch norm against one process
on the concatenated batch, the layer and convert_sync_batchnorm, bad input on one
rank, data-parallel training against one process, and faults (a killed rank, an
uncaught exception, Ctrl-C) with resume.

Each MPI case runs a script of tests/distributed/mpi_scripts/ through ``mpiexec`` in a
subprocess with a timeout and parses the JSON line each rank prints.  Skipped
when mpi4py or mpiexec is missing (``pip install -e '.[mpi]'``).
"""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
TIMEOUT = 120


def _mpiexec():
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="needs mpi4py and mpiexec: pip install -e '.[mpi]'")


def _env(results=None):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_WAIT_POLICY="passive", OPENBLAS_NUM_THREADS="1")
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    if results is not None:
        env["NUMBABN_MPI_RESULTS"] = str(results)
    return env


def _results(folder):
    """Every rank's JSON records (see mpi_scripts/common.emit), by rank."""
    results = {}
    for path in sorted(Path(folder).glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            results.setdefault(record["rank"], []).append(record)
    return results


def mpirun(args, n=2, timeout=TIMEOUT, check=True):
    """Run ``mpiexec -n n python <args>``; return (completed process, results by rank)."""
    folder = Path(tempfile.mkdtemp(prefix="numbabn-mpi-"))
    try:
        done = subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, args)], cwd=ROOT,
                              env=_env(folder), capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check:
            assert done.returncode == 0, (f"rc {done.returncode}\n{done.stdout[-3000:]}\n"
                                          f"{done.stderr[-3000:]}")
        return done, _results(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _scripts_module(name, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- #
# Without MPI.
# --------------------------------------------------------------------------- #
def _run_python(code):
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_importing_numbabn_distributed_does_not_import_mpi4py():
    code = "import sys, numbabn, numbabn.distributed, numbabn.mnist.train; print('mpi4py' in sys.modules)"
    assert _run_python(code) == "False"


def test_without_mpi4py_the_first_call_names_the_extra():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import numpy as np\n"
            "from numbabn.distributed import sync_batch_norm_train\n"
            "try:\n"
            "    sync_batch_norm_train(np.ones((4, 3), np.float32))\n"
            "except ImportError as e:\n"
            "    print(repr(str(e)))\n")
    assert "pip install -e '.[mpi]'" in _run_python(code)


def test_shard_bounds_split_like_array_split():
    from numbabn.mnist.distributed import shard_bounds

    for n in range(0, 12):
        for size in range(1, 5):
            parts = np.array_split(np.arange(n), size)
            for rank in range(size):
                lo, hi = shard_bounds(n, size, rank)
                assert list(range(lo, hi)) == list(parts[rank])


# --------------------------------------------------------------------------- #
# Sync batch norm, the layer and the conversion: one mpiexec run.
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def sync_bn():
    done, results = mpirun([SCRIPTS / "sync_bn.py"])
    assert sorted(results) == [0, 1], done.stderr[-2000:]
    return {rank: records[0] for rank, records in results.items()}


TOL = {"float32": 1e-6, "float64": 1e-12}


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_sync_batch_norm_equals_one_process_on_the_concatenated_batch(sync_bn):
    # dense, (N, C, L), NCHW and NHWC (axis=-1); float32 and float64; rows split 4+4, 3+5, 0+8.
    checked = 0
    for rank, result in sync_bn.items():
        for case in result["cases"]:
            assert case["shapes_ok"], case["case"]
            assert case["stats_dtype"] == ["float64", "float64"], case["case"]
            for what, err in case["err"].items():
                assert err <= TOL[case["dtype"]], f"rank {rank} {case['case']} {what}: {err:.3g}"
                checked += 1
    assert checked == 2 * 24 * 6


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_statistics_are_bitwise_identical_on_every_rank(sync_bn):
    for case0, case1 in zip(sync_bn[0]["cases"], sync_bn[1]["cases"]):
        assert case0["stats_digest"] == case1["stats_digest"], case0["case"]


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_sync_batchnorm_layer_equals_batchnorm2d_on_the_whole_batch(sync_bn):
    for rank, result in sync_bn.items():
        for case in result["layers"]:
            tol = TOL["float64" if "float64" in case["case"] else "float32"]
            for what, err in case["err"].items():
                assert err <= tol, f"rank {rank} {case['case']} {what}: {err:.3g}"
            assert case["num_batches_tracked"] == 2 and case["state_keys_match"]
    for case0, case1 in zip(sync_bn[0]["layers"], sync_bn[1]["layers"]):
        assert case0["running_digest"] == case1["running_digest"], case0["case"]


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_convert_sync_batchnorm_shares_arrays_and_matches_the_model(sync_bn):
    for rank, result in sync_bn.items():
        convert = result["convert"]
        assert convert["types"] == ["SyncBatchNorm", "SyncBatchNorm"]  # nested one included
        assert convert["same_arrays"]
        for what, err in convert["err"].items():
            assert err <= 1e-6, f"rank {rank} {what}: {err:.3g}"
    assert sync_bn[0]["convert"]["buffers_digest"] == sync_bn[1]["convert"]["buffers_digest"]


FAULTS = {  # label: (error class, words in the message, ranks named)
    "string input": ("TypeError", "rank 1: TypeError: x must be a numpy.ndarray", [1]),
    "dtype": ("TypeError", "disagree on the dtype (rank 0: float32, rank 1: float64)", [1]),
    "features": ("ValueError", "disagree on the number of features C (rank 0: 3, rank 1: 2)", [1]),
    "weight shape": ("ValueError", "rank 1: ValueError: weight must have shape (3,)", [1]),
    "eps": ("ValueError", "disagree on eps", [1]),
    "one value": ("ValueError", "more than 1 value per feature over all ranks", []),
    "backward mean": ("ValueError", "disagree on mean and invstd", [1]),
    "backward dy": ("ValueError", "rank 1: ValueError: dy must have the shape of x", [1]),
    "layer input": ("ValueError", "rank 1: ValueError: SyncBatchNorm expects an input of shape", [1]),
    "layer dtype": ("TypeError", "rank 1: TypeError: SyncBatchNorm expects dtype float32", [1]),
}


@pytest.mark.slow  # mpiexec runs
@needs_mpi
@pytest.mark.parametrize("label", sorted(FAULTS))
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(sync_bn, label):
    kind, words, ranks = FAULTS[label]
    outcomes = [next(f for f in sync_bn[rank]["faults"] if f["label"] == label) for rank in (0, 1)]
    for outcome in outcomes:
        assert outcome["raised"] == [kind], outcome
        assert words in outcome["message"], outcome["message"]
        assert outcome["ranks"] == ranks
        assert outcome["then_ok"]  # the ranks are still in step: the next call works
    assert outcomes[0]["message"] == outcomes[1]["message"]


# --------------------------------------------------------------------------- #
# Training.
# --------------------------------------------------------------------------- #
@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_two_process_training_gives_the_losses_of_one_process(tmp_path, monkeypatch):
    from numbabn.mnist import train as train_module

    steps = _scripts_module("train_steps", monkeypatch)
    common = _scripts_module("common", monkeypatch)
    done, results = mpirun([SCRIPTS / "train_steps.py", tmp_path / "dist"])
    assert results[0][0]["threads"] == 1  # one Numba thread per core each (2 ranks, 2 cores)
    real = train_module.cross_entropy
    for name, config in steps.CONFIGS.items():
        losses = []

        def recording(logits, y):
            out = real(logits, y)
            losses.append(out[0])
            return out

        monkeypatch.setattr(train_module, "cross_entropy", recording)
        train_module.Trainer(config, common.synthetic_data(), str(tmp_path / name), progress=False,
                             log=lambda s: None).train_epoch(0, 1)
        monkeypatch.setattr(train_module, "cross_entropy", real)
        mine = [results[rank][0]["results"][name] for rank in (0, 1)]
        assert mine[0]["digest"] == mine[1]["digest"], name  # bitwise identical replicas
        assert len(mine[0]["losses"]) == len(losses) == {"mlp": 20, "cnn": 3}[name]
        np.testing.assert_allclose(mine[0]["losses"], losses, rtol=1e-5, atol=0, err_msg=name)


# --------------------------------------------------------------------------- #
# Faults.
# --------------------------------------------------------------------------- #
def _event(results, rank, event):
    return next(r for r in results.get(rank, []) if r.get("event") == event)


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_killed_rank_ends_the_job_and_resume_continues_from_the_last_checkpoint(tmp_path, monkeypatch):
    from numbabn.mnist.checkpoint import load_checkpoint
    from numbabn.mnist.train import Trainer

    out = tmp_path / "run"
    done, results = mpirun([SCRIPTS / "faults.py", "kill", out], check=False)
    ended = time.time()
    assert done.returncode != 0
    killed_at = _event(results, 1, "kill")["time"]
    assert ended - killed_at < 10, f"the job took {ended - killed_at:.1f} s to end after the kill"
    assert all(r.get("event") != "finished" for records in results.values() for r in records)
    assert load_checkpoint(out / "checkpoint.npz")[1]["epochs_done"] == 1  # epoch 2 never finished

    faults = _scripts_module("faults", monkeypatch)  # a distributed checkpoint loads in one process
    single = Trainer(faults.CONFIG, faults.DATA, str(out), progress=False, log=lambda s: None)
    single.resume()
    assert single.epochs_done == 1

    done, results = mpirun([SCRIPTS / "faults.py", "resume", out])
    for rank in (0, 1):
        resumed = _event(results, rank, "resumed")
        assert resumed["start_epoch"] == 1 and resumed["epochs_done"] == 3
        assert resumed["same_state"] and resumed["same_history"]  # bitwise an uninterrupted run
    assert _event(results, 0, "resumed")["digest"] == _event(results, 1, "resumed")["digest"]


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_uncaught_exception_on_one_rank_aborts_the_job(tmp_path):
    done, results = mpirun([SCRIPTS / "faults.py", "raise", tmp_path / "run"], check=False)
    ended = time.time()
    assert done.returncode != 0
    assert ended - _event(results, 1, "raise")["time"] < 10
    assert "[rank 1/2] RuntimeError: rank 1 fails on purpose" in done.stderr + done.stdout


CLI = ["-m", "numbabn.mnist.cli", "--distributed", "--model", "mlp", "--limit-train", "600",
       "--no-progress"]


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_cli_ctrl_c_ends_the_job_and_resume_finishes_it(tmp_path):
    from numbabn.mnist.checkpoint import load_checkpoint
    from numbabn.mnist.data import load_mnist
    from numbabn.mnist.options import build_parser, config_from_args
    from numbabn.mnist.train import Trainer, evaluate

    out = tmp_path / "run"
    args = [*CLI, "--out", str(out)]
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, *args, "--epochs", "1000"], cwd=ROOT,
                           env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while not (out / "checkpoint.npz").exists():
            assert job.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.1)
        time.sleep(0.3)
        job.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal sends mpiexec
        sent = time.time()
        stdout, stderr = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 130, (job.returncode, stderr[-2000:])
    assert time.time() - sent < 10
    assert "interrupted: the last complete checkpoint" in stderr
    epochs = load_checkpoint(out / "checkpoint.npz")[1]["epochs_done"]
    assert epochs >= 1

    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, *args, "--epochs", str(epochs + 1),
                           "--resume"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resuming from {out / 'checkpoint.npz'} after epoch {epochs}" in done.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and [h["epoch"] for h in metrics["history"]] == list(
        range(1, epochs + 2))

    # The distributed checkpoint in one process: the same test accuracy.
    config = config_from_args(build_parser().parse_args(args[2:]))
    single = Trainer(config, load_mnist(), str(out), progress=False, log=lambda s: None)
    single.resume()
    assert single.epochs_done == epochs + 1
    assert evaluate(single.model, single.test_x, single.test_y)[1] == metrics["test_accuracy"]


@pytest.mark.slow  # mpiexec runs
@needs_mpi
def test_cli_missing_checkpoint_is_reported_once_and_every_rank_exits(tmp_path):
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, *CLI, "--out", str(tmp_path),
                           "--epochs", "1", "--resume"], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=TIMEOUT, check=False)
    assert done.returncode == 2
    assert done.stderr.count("numbabn-mnist: error: loading the checkpoint failed on rank 0 of 2") == 1
    assert "no checkpoint at" in done.stderr


def test_convert_sync_batchnorm_refuses_variants_without_a_synchronised_version():
    from numbabn.distributed import SyncBatchNorm, convert_sync_batchnorm
    from numbabn.kit import Linear, Sequential
    from numbabn.layers import BatchNorm1d
    from numbabn.mnist.models import build_model
    model = build_model("mlp", np.random.default_rng(0), norm="renorm")
    before = [type(layer) for layer in model.layers]
    with pytest.raises(TypeError, match="BatchRenorm1d has no synchronised version"):
        convert_sync_batchnorm(model)
    assert [type(layer) for layer in model.layers] == before  # left as it was
    ghost = Sequential(Linear(3, 4), BatchNorm1d(4), Sequential(BatchNorm1d(4, virtual_batch_size=2)))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        convert_sync_batchnorm(ghost)
    assert type(ghost[1]) is BatchNorm1d
    bn = BatchNorm1d(4, momentum=None, affine=False)
    sync = convert_sync_batchnorm(bn)  # no communicator needed to convert
    assert type(sync) is SyncBatchNorm and sync.running_var is bn.running_var
    assert sync.momentum is None and not sync.affine and sync.params == {}
