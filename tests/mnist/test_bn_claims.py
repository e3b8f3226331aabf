"""``scripts/bn_claims.py`` (:mod:`numbabn.mnist.claims`): the verdicts on results whose
answer is known both ways, a tiny grid on the shipped MNIST end to end (every run and
its settings in claims.json, valid PNGs, verdicts computed from the runs) and its
determinism, and the model options the grid uses."""

import json
from dataclasses import asdict

import numpy as np
import pytest

from numbabn.kit import Dropout, Linear, ReLU, Sigmoid
from numbabn.layers import BatchNorm1d, BatchNorm2d, BatchRenorm1d, GroupNorm
from numbabn.mnist import claims
from numbabn.mnist.models import GROUPS, MLP_DROPOUT, bn_paper_mlp, build_model, mnist_cnn

PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- #
# Verdicts on synthetic results
# --------------------------------------------------------------------------- #
def _run(claim, norm, test, train=None, losses=(2.0, 1.0), diverged=False, probe=None, **settings):
    if norm == "ghost":
        settings.setdefault("ghost_batch", min(16, settings.get("batch_size", 60)))
    spec = claims.RunSpec(claim, norm=norm, **settings)
    r = {"settings": asdict(spec), "label": spec.label(), "test_accuracy": test,
         "train_accuracy": test if train is None else train, "diverged": diverged,
         "step_losses": list(losses)}
    if probe is not None:
        r["probe"] = probe
    return r


def _probe(grad_norms, means):
    steps = list(range(len(grad_norms)))
    return {"steps": steps, "grad_norm": grad_norms, "act_mean": [[0.0] * 3] * len(steps),
            "act_std": [[1.0] * 3] * len(steps), "shift": [None] + [[m] * 3 for m in means[1:]]}


def synthetic_results(bn_wins):
    """Results where BN (and the small-batch remedies) win every claim, or lose every one."""
    good, bad = (("batch", "none") if bn_wins else ("none", "batch"))
    fast, slow = [2.0 * 0.5 ** i for i in range(40)], [2.0 - 0.04 * i for i in range(40)]
    out = []
    for seed in (0, 1):
        for lr, (a_good, a_bad) in {0.01: (0.90, 0.50), 0.1: (0.95, 0.93), 1.0: (0.94, 0.60),
                                    10.0: (0.92, 0.10)}.items():
            out += [_run("lr", good, a_good, losses=fast, lr=lr, seed=seed),
                    _run("lr", bad, a_bad, losses=slow, lr=lr, seed=seed)]
        for scale, (a_good, a_bad) in {0.1: (0.92, 0.11), 1.0: (0.95, 0.94), 10.0: (0.93, 0.20)}.items():
            out += [_run("init", good, a_good, init_scale=scale, seed=seed),
                    _run("init", bad, a_bad, init_scale=scale, seed=seed)]
        steady = _probe([[1.0, 1.1, 0.9, 1.0]] * 6, [0.01] * 6)
        wild = _probe([[10.0 ** (-3 + t % 2), 1.0, 10.0, 0.1] for t in range(6)], [0.5] * 6)
        out += [_run("gradients", good, 0.9, probe=steady, record_every=1, seed=seed),
                _run("gradients", bad, 0.9, probe=wild, record_every=1, seed=seed)]
        # gap and dropout gain: small for the winner, large for the loser
        out += [_run("dropout", good, 0.95, train=0.97, dropout=False, seed=seed),
                _run("dropout", good, 0.95, train=0.96, dropout=True, seed=seed),
                _run("dropout", bad, 0.90, train=1.00, dropout=False, seed=seed),
                _run("dropout", bad, 0.94, train=0.97, dropout=True, seed=seed)]
        for b in (2, 8, 32, 128):
            small = b <= claims.SMALL_BATCH
            bn = (0.50 if small else 0.95) if bn_wins else 0.95
            remedy = 0.93 if bn_wins else (0.45 if small else 0.95)
            ghost = (bn if small else 0.96) if bn_wins else (bn - 0.02)
            out += [_run("batch", "batch", bn, batch_size=b, seed=seed),
                    _run("batch", "renorm", remedy, batch_size=b, seed=seed),
                    _run("batch", "group", 0.93 if bn_wins else 0.80, batch_size=b, seed=seed),
                    _run("batch", "ghost", ghost, batch_size=b, seed=seed)]
    return out


def test_verdicts_supported_when_the_data_say_so():
    items = claims.verdicts(synthetic_results(bn_wins=True))
    assert [v.claim for v in items] == ["lr", "lr", "init", "gradients", "gradients", "dropout", "dropout",
                                        "batch", "batch", "batch", "batch", "batch"]
    by = {v.statement: v for v in items}
    # ghost BN at batches <= its ghost size is BN: no help there, whatever the other panels say
    assert not by["ghost batches help at small batches"].supported
    assert "it is BN" in by["ghost batches help at small batches"].evidence
    assert all(v.supported for s, v in by.items() if s != "ghost batches help at small batches"), \
        [(v.statement, v.evidence) for v in items if not v.supported]
    assert by["BN tolerates higher learning rates"].numbers["usable"]["batch"] == [0.01, 0.1, 1.0, 10.0]
    table = claims.verdict_table(items)
    assert table.count("supported") == len(items) and table.count("not supported here") == 1


def test_verdicts_not_supported_when_the_data_say_otherwise():
    items = claims.verdicts(synthetic_results(bn_wins=False))
    assert len(items) == 12
    assert not any(v.supported for v in items), [(v.statement, v.evidence) for v in items if v.supported]
    assert all(v.answer == "not supported here" for v in items)


def test_verdicts_average_over_seeds_and_skip_absent_panels():
    runs = [_run("init", "batch", a, init_scale=s, seed=seed)
            for seed, a in ((0, 0.9), (1, 0.5)) for s in (0.1, 1.0)]
    runs += [_run("init", "none", 0.72, init_scale=s, seed=seed) for seed in (0, 1) for s in (0.1, 1.0)]
    (v,) = claims.verdicts(runs)  # only the init panel is present
    assert v.numbers["accuracy"]["batch"] == {0.1: 0.7, 1.0: 0.7}
    assert not v.supported  # mean 70% with BN against 72% without


def test_steps_to_reach_uses_the_moving_average():
    assert claims.steps_to_reach([3.0, 1.0, 1.0, 1.0], 1.5, span=1) == 1
    assert claims.steps_to_reach([3.0, 1.0, 1.0, 1.0], 1.5, span=3) == 2  # 3, 2, 1.5
    assert claims.steps_to_reach([3.0, 2.0], 1.0, span=1) is None


def test_run_spec_checks_its_settings():
    with pytest.raises(ValueError, match="unknown claim"):
        claims.RunSpec("speed")
    with pytest.raises(ValueError, match="unknown norm"):
        claims.RunSpec("lr", norm="layer")
    with pytest.raises(ValueError, match="ghost_batch"):
        claims.RunSpec("batch", norm="ghost")
    with pytest.raises(ValueError, match="ghost_batch"):
        claims.RunSpec("batch", norm="batch", ghost_batch=4)


# --------------------------------------------------------------------------- #
# The grid
# --------------------------------------------------------------------------- #
def test_quick_grid_covers_every_claim():
    runs = claims.grid_runs(claims.GRIDS["quick"])
    by_claim = {c: [r for r in runs if r.claim == c] for c in claims.CLAIMS}
    assert {r.lr for r in by_claim["lr"]} == {0.01, 0.1, 1.0, 10.0}
    assert {(r.norm, r.init_scale) for r in by_claim["init"]} == {(n, s) for n in ("none", "batch")
                                                                  for s in (0.1, 1.0, 10.0)}
    assert all(r.record_every > 0 for r in by_claim["gradients"])
    assert {(r.norm, r.dropout) for r in by_claim["dropout"]} == {(n, d) for n in ("none", "batch")
                                                                  for d in (False, True)}
    batch = by_claim["batch"]
    assert {(r.norm, r.batch_size) for r in batch} == {(n, b) for n in ("batch", "renorm", "group", "ghost")
                                                       for b in (2, 8, 32, 128)}
    for r in batch:
        assert r.lr == pytest.approx(0.5 * r.batch_size / 60)
        if r.norm == "ghost":
            assert r.batch_size % r.ghost_batch == 0 and r.ghost_batch == min(16, r.batch_size)
    assert len({r for r in runs}) == len(runs)  # no run twice


def test_build_scales_the_linear_weights_only():
    base, _ = claims.build(claims.RunSpec("init", norm="batch"))
    scaled, opt = claims.build(claims.RunSpec("init", norm="batch", init_scale=10.0, lr=0.3))
    assert opt.lr == 0.3
    for key, p in base.params.items():
        expected = p * np.float32(10.0) if p.ndim == 2 else p
        np.testing.assert_array_equal(scaled.params[key], expected, err_msg=key)


def _tiny(tmp_path, name, jobs, *extra):
    out = tmp_path / name
    lines = []
    rc = claims.main(["--quick", "--limit-train", "256", "--limit-test", "500", "--jobs", str(jobs),
                      "--out", str(out), *extra], log=lines.append)
    assert rc == 0
    return out, json.loads((out / "claims.json").read_text()), "\n".join(map(str, lines))


def _strip_times(runs):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


def test_tiny_grid_on_real_mnist_end_to_end_and_deterministic(tmp_path):
    out, report, printed = _tiny(tmp_path, "a", jobs=2)
    grid = claims.grid_from_args(claims.build_parser().parse_args(["--quick", "--limit-train", "256"]))
    specs = claims.grid_runs(grid)
    runs = report["runs"]
    assert [r["settings"] for r in runs] == [asdict(s) for s in specs]  # every run, its settings
    assert report["settings"] == json.loads(json.dumps(asdict(grid)))
    for r in runs:
        s = r["settings"]
        n = min(256, grid.dropout_limit_train if s["claim"] == "dropout" else grid.limit_train)
        if not r["diverged"]:
            assert r["steps"] == len(r["step_losses"]) == s["epochs"] * (n // s["batch_size"])
            assert all(np.isfinite(r["step_losses"]))
        for key in ("train_accuracy", "test_accuracy"):
            assert 0.0 <= r[key] <= 1.0
        if s["claim"] == "gradients":
            p = r["probe"]
            assert p["steps"] == list(range(0, r["steps"], s["record_every"]))
            assert np.shape(p["grad_norm"]) == (len(p["steps"]), 4)  # the four Linear layers
            assert np.shape(p["act_mean"]) == np.shape(p["act_std"]) == (len(p["steps"]), 3)
            assert p["shift"][0] is None
            assert all(len(shift) == 3 for shift in p["shift"][1:])
    # the verdicts are those of the runs, and the table prints each
    recomputed = [dict(asdict(v), answer=v.answer) for v in claims.verdicts(runs)]
    assert report["verdicts"] == json.loads(json.dumps(claims._jsonable(recomputed)))
    for v in report["verdicts"]:
        assert f"{v['statement']}" in printed and v["answer"] in printed
    assert set(report["figures"]) == set(claims.CLAIMS)
    from matplotlib.image import imread
    for name in report["figures"].values():
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) < 200_000
        assert imread(out / name).ndim == 3  # decodes
    # same seeds, one worker instead of two (two panels, to keep it short): the same
    # results, verdicts and figures, bit for bit
    out_b, report_b, _ = _tiny(tmp_path, "b", 1, "--claims", "gradients", "batch")
    again = [r for r in runs if r["settings"]["claim"] in ("gradients", "batch")]
    assert _strip_times(report_b["runs"]) == _strip_times(again)
    assert report_b["verdicts"] == [v for v in report["verdicts"] if v["claim"] in ("gradients", "batch")]
    assert set(report_b["figures"]) == {"gradients", "batch"}
    for name in report_b["figures"].values():
        assert (out_b / name).read_bytes() == (out / name).read_bytes(), name


# --------------------------------------------------------------------------- #
# The model options
# --------------------------------------------------------------------------- #
def test_mlp_defaults_unchanged_and_the_new_options():
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    plain = bn_paper_mlp(rng_a)
    assert [type(layer) for layer in plain.layers[1:4]] == [Linear, BatchNorm1d, Sigmoid]
    same = build_model("mlp", rng_b, activation="sigmoid", virtual_batch_size=None, dropout=False)
    for key, p in plain.params.items():
        np.testing.assert_array_equal(same.params[key], p)
    relu = bn_paper_mlp(np.random.default_rng(0), activation="relu", dropout=True)
    kinds = [type(layer) for layer in relu.layers]
    assert kinds.count(ReLU) == 3 and Sigmoid not in kinds
    assert [layer.p for layer in relu.layers if isinstance(layer, Dropout)] == [MLP_DROPOUT] * 3
    group = bn_paper_mlp(np.random.default_rng(0), norm="group")
    assert [layer.num_groups for layer in group.layers if isinstance(layer, GroupNorm)] == [GROUPS] * 3
    ghost = bn_paper_mlp(np.random.default_rng(0), virtual_batch_size=4)
    assert [layer.virtual_batch_size for layer in ghost.layers if isinstance(layer, BatchNorm1d)] == [4] * 3
    with pytest.raises(ValueError, match="unknown activation"):
        bn_paper_mlp(np.random.default_rng(0), activation="tanh")
    with pytest.raises(ValueError, match="needs norm='batch'"):
        bn_paper_mlp(np.random.default_rng(0), norm="renorm", virtual_batch_size=4)
    renorm = build_model("mlp", np.random.default_rng(0), norm="renorm")
    assert BatchRenorm1d in {type(layer) for layer in renorm.layers}


def test_cnn_takes_group_norm_and_ghost_batches():
    cnn = mnist_cnn(np.random.default_rng(0), norm="group")
    assert [layer.num_channels for layer in cnn.layers if isinstance(layer, GroupNorm)] == [32, 64, 128]
    ghost = mnist_cnn(np.random.default_rng(0), virtual_batch_size=8)
    assert {layer.virtual_batch_size for layer in ghost.layers
            if isinstance(layer, (BatchNorm1d, BatchNorm2d))} == {8}
