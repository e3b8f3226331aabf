"""numbabn.torch.SyncBatchNorm under DistributedDataParallel on CPUs: two
processes on gloo (127.0.0.1), launched in a subprocess with a timeout, against
the stock layers trained on the whole batch in one process."""

import os
import socket
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch")
nbt = pytest.importorskip("numbabn.torch")
if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
REL = 1e-10  # float64


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    for attempt in range(2):
        proc = subprocess.run([sys.executable, os.path.join(HERE, "ddp_worker.py"), str(out),
                               str(_free_port())], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=240)
        # A rank sometimes aborts in C++ before any result ("terminate called without an
        # active exception", SIGABRT; about 1 cold-cache run in 4 on the 2-core VM, cause
        # not found): that one failure is retried once and reported as a warning.
        if proc.returncode == 0 or attempt or "terminate called without an active exception" \
                not in proc.stderr:
            break
        warnings.warn(f"a DDP rank aborted; retrying once: {proc.stderr[-500:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def close(a, ref, what):
    err = (a - ref).abs().max().item()
    assert err <= REL * max(ref.abs().max().item(), 1e-300), f"{what}: {err:.3g}"


@pytest.mark.slow  # two processes: imports, a process group, cold compiles
def test_ddp_training_matches_stock_on_the_whole_batch_and_ranks_agree_bitwise(ranks):
    r0, r1 = ranks[0]["train"], ranks[1]["train"]
    for i, ref in enumerate(r0["ref_outputs"]):
        close(torch.cat([r0["outputs"][i], r1["outputs"][i]]), ref, f"step {i} outputs")
        close(torch.cat([r0["input_grads"][i], r1["input_grads"][i]]), r0["ref_input_grads"][i],
              f"step {i} input grads")
    for k, ref in r0["ref_state"].items():
        assert torch.equal(r0["state"][k], r1["state"][k]), f"{k} differs between the ranks"
        if ref.dtype == torch.long:
            assert torch.equal(r0["state"][k], ref), k
        else:
            close(r0["state"][k], ref, k)  # parameters after 3 SGD steps, running statistics
    assert torch.equal(r0["eval"], r1["eval"])


@pytest.mark.slow
def test_bad_input_on_one_rank_raises_the_same_error_on_every_rank(ranks):
    r0, r1 = ranks[0]["bad"], ranks[1]["bad"]
    assert r0["channels"] == r1["channels"]
    assert r0["channels"][0] == "ValueError" and "rank 1: expected 4 channels" in r0["channels"][1]
    assert r0["dtype"] == r1["dtype"] and r0["dtype"][0] == "TypeError"
    assert "rank 0" in r0["dtype"][1]
    assert r0["one_value"] == r1["one_value"] and r0["one_value"][0] == "ValueError"
    assert "more than 1 value per channel" in r0["one_value"][1]
    # the ranks stay in step after an error: later calls synchronise as before
    for name in ("ndim", "empty", "too_few"):
        assert r0[name][0] == r1[name][0] == "ok", name
        assert torch.equal(r0[name][2], r1[name][2]), f"{name}: running means differ"


def test_convert_and_restore_keep_parameters_and_buffers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4).eval(),
                                nbt.BatchNorm1d(4), torch.nn.SyncBatchNorm(4))
    before = [id(t) for t in (*model.parameters(), *model.buffers())]
    out = nbt.convert_sync_batchnorm(model)
    assert out is model and all(type(model[i]) is nbt.SyncBatchNorm for i in (1, 2, 3))
    assert not model[1].training and model[2].training
    assert [id(t) for t in (*model.parameters(), *model.buffers())] == before
    bn = torch.nn.BatchNorm2d(4)
    assert type(nbt.SyncBatchNorm.convert_sync_batchnorm(bn)) is nbt.SyncBatchNorm
    nbt.restore_batchnorm(model)
    assert all(type(model[i]) is torch.nn.SyncBatchNorm for i in (1, 2, 3))


def test_sync_batchnorm_without_a_process_group_is_local_batch_norm():
    torch.manual_seed(0)
    stock = torch.nn.BatchNorm2d(4, dtype=torch.float64)
    mine = nbt.convert_sync_batchnorm(torch.nn.BatchNorm2d(4, dtype=torch.float64))
    for _ in range(2):
        x = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 3 + 1
        close(mine(x), stock(x), "y")
    for k, v in stock.state_dict().items():
        close(mine.state_dict()[k].double(), v.double(), k)
