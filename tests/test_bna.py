import copy
import json
import math

import pytest
import torch
from torch import nn

from pydefend.cli import main
from pydefend.defenses import BNA, BNAConfig, CleanData
from pydefend.defenses.bna import (NC_CONSISTENCY, BNAModel, BNATransform, TriggerBank, _Sites, anomaly_index,
                                   detection_index, find_sites, inference_rule)
from pydefend.metrics import detection_rates, evaluate
from pydefend.ops.soft_histogram import f_divergence, soft_histogram
from pydefend.repaired import load_repaired, save_repaired



@pytest.fixture(scope="module")
def bna_and_detection(demo_backdoor):
    """BNA with its defaults on the demo's model, and the detection it mitigated with (banks included)."""
    seen, detect = {}, BNA.detect

    def spy(self, *args, **kwargs):
        seen.update(detect(self, *args, **kwargs))
        return seen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BNA, "detect", spy)
        result = BNA().run(copy.deepcopy(demo_backdoor["model"]), demo_backdoor["clean"], BNAConfig(),
                           progress=False)
    return result, seen


@pytest.fixture(scope="module")
def bna_run(bna_and_detection):
    return bna_and_detection[0]


# --------------------------------------------------------------------------- detection statistics
def test_anomaly_index_on_hand_built_statistics():
    s = torch.tensor([10.0, 12.0, 11.0, 9.0, 3.0, 10.0, 11.0])
    # median 10; |deviations| 0 2 1 1 7 0 1 -> MAD 1
    index = anomaly_index(s, small_is_anomalous=True, consistency=NC_CONSISTENCY)
    expected = torch.tensor([0.0, -2.0, -1.0, 1.0, 7.0, 0.0, -1.0], dtype=torch.float64) / NC_CONSISTENCY
    torch.testing.assert_close(index, expected)
    # the other side, as for the pairs' 1/‖δ‖₂ statistic with the paper's plain MAD score
    torch.testing.assert_close(anomaly_index(s, small_is_anomalous=False), -expected * NC_CONSISTENCY)
    # MAD = 0: the median scores 0, any deviation on the suspicious side is infinitely anomalous
    flat = anomaly_index(torch.tensor([5.0, 5.0, 5.0, 1.0, 7.0]), small_is_anomalous=True)
    assert flat.tolist() == [0.0, 0.0, 0.0, math.inf, -math.inf]
    # an even count (ten classes): the median is the mean of the two middle values, as numpy's (Neural Cleanse)
    ten = torch.tensor([3.0, 20, 21, 22, 23, 30, 31, 32, 33, 34])
    # median 26.5; |deviations| 23.5 6.5 5.5 4.5 3.5 3.5 4.5 5.5 6.5 7.5 -> MAD 5.5
    assert anomaly_index(ten, True, NC_CONSISTENCY)[0].item() == pytest.approx(23.5 / (5.5 * NC_CONSISTENCY))


def test_log_statistic_is_scale_free_and_reciprocal_free():
    # mask sizes measured on the Fashion-MNIST BadNets model: the target's is 6x smaller than any other, but
    # the clean classes spread from 35 to 100 pixels, so the linear index stays under Neural Cleanse's 2
    sizes = torch.tensor([5.94, 35.56, 46.97, 63.31, 42.98, 73.69, 36.67, 100.25, 35.34, 64.57], dtype=torch.float64)
    linear = detection_index(sizes, BNAConfig(statistic="linear"))
    log = detection_index(sizes, BNAConfig())
    assert linear[0] < 2 < log[0] and (log[1:] < 1).all()
    torch.testing.assert_close(detection_index(sizes * 37.0, BNAConfig()), log)  # units do not matter
    # pairs mode scores 1/size; on the log scale that is the same index as scoring the size itself
    pairs = BNAConfig(detection="pairs")
    torch.testing.assert_close(detection_index(sizes, pairs), anomaly_index(sizes.log(), True))
    with pytest.raises(ValueError, match="statistic must be"):
        BNAConfig(statistic="sqrt")


def test_trigger_bank_applies_each_jobs_trigger():
    bank = TriggerBank("patch", [0, 2], [[1, 2], [0]], (1, 4, 4))
    with torch.no_grad():
        bank.mask_raw.fill_(-20.0)  # mask 0 ...
        bank.mask_raw[1, 0, 0, 0] = 20.0  # ... except one pixel of job 1
        bank.pattern_raw.fill_(20.0)
    rows, jobs = bank.job_pairs(torch.tensor([0, 1, 2, 2]))
    assert list(zip(rows.tolist(), jobs.tolist())) == [(0, 1), (1, 0), (2, 0), (3, 0)]
    x = torch.rand(4, 1, 4, 4) * 0.5
    out = bank.apply(x, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(out[[0, 2]], x[[0, 2]], atol=1e-6, rtol=0)
    assert torch.allclose(out[[1, 3], 0, 0, 0], torch.ones(2)) and torch.allclose(out[[1, 3], 0, 1:], x[[1, 3], 0, 1:])
    torch.testing.assert_close(bank.sizes(), torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    delta = TriggerBank("perturbation", [1], [[0]], (1, 4, 4))
    with torch.no_grad():
        delta.delta.fill_(0.75)
    assert delta.apply(x, torch.zeros(4, dtype=torch.long)).max() == 1.0  # clipped to the image range
    torch.testing.assert_close(delta.sizes(), torch.tensor([3.0]))


def test_reverse_engineered_trigger_overlaps_the_true_patch(demo_backdoor, bna_and_detection):
    bna_run, detection = bna_and_detection
    report = bna_run.report
    assert report["detected_targets"] == [0], report["detection"]
    assert list(report["detection"]["triggers"]) == ["patch", "perturbation"]
    jobs = report["detection"]["triggers"]["patch"]["jobs"]
    indices = [float(j["anomaly_index"]) for j in jobs]
    assert indices[0] == max(indices) and indices[0] > 1.5 * sorted(indices)[-2], indices
    assert [j["target"] for j in jobs] == list(range(10))
    assert all(j["sources"] == [s for s in range(10) if s != j["target"]] for j in jobs)
    assert jobs[0]["flagged"] and jobs[0]["anomaly_index"] > report["detection"]["threshold"]
    # the nine strongest mask pixels of target 0 against the attack's own patch
    height, width = demo_backdoor["dataset"].image_size
    patch = (demo_backdoor["attack"].apply(torch.zeros(1, 1, height, width)) != 0)[0, 0]
    mask = detection["banks"]["patch"].mask()[0, 0].detach()
    top = torch.zeros(height * width, dtype=torch.bool)
    top[mask.flatten().topk(9).indices] = True
    assert (top.view(height, width) & patch).sum() >= 6, mask


def test_both_trigger_kinds_flag_with_either(bna_and_detection):
    detection = bna_and_detection[1]
    triggers = detection["report"]["triggers"]
    assert list(triggers) == ["patch", "perturbation"] and list(detection["banks"]) == ["patch", "perturbation"]
    flagged = {kind: {j["target"]: j["anomaly_index"] for j in t["jobs"] if j["flagged"]}
               for kind, t in triggers.items()}
    assert detection["targets"] == sorted(set(flagged["patch"]) | set(flagged["perturbation"]))
    for t in detection["targets"]:
        kind = detection["kinds"][t]
        other = "perturbation" if kind == "patch" else "patch"
        assert flagged[kind][t] >= flagged[other].get(t, -math.inf)


def test_nothing_detected_returns_the_model_unchanged(tiny_backdoor):
    model = tiny_backdoor["model"]
    result = BNA().run(model, tiny_backdoor["clean"], BNAConfig(threshold=1e9, re_steps=20), progress=False)
    assert result.model is model and result.wrapper is None
    assert result.report["detected_targets"] == [] and "unchanged" in result.report["outcome"]
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- mitigation
def test_backdoor_removed_and_divergence_decreases(demo_backdoor, bna_run):
    before = demo_backdoor["before"]
    after = evaluate(bna_run.model, demo_backdoor["dataset"], demo_backdoor["attack"])
    assert before["asr"] > 0.9 and after["asr"] < 0.1, (before, after)
    assert after["acc"] > before["acc"] - 0.03 and after["ra"] > 0.5, (before, after)
    info = bna_run.report["mitigation"]["targets"]["0"]
    assert info["trigger_reused_from_detection"] and info["sources"] == list(range(1, 10))
    assert info["trigger"] == bna_run.report["detection"]["trigger_used"]["0"]
    totals = [e["total"] for e in info["epochs"]]
    assert len(totals) == BNAConfig().epochs + 1 and totals[-1] < 0.8 * totals[0], totals
    # before alignment means f itself on triggered images; the initial clip at the clean range already helps
    original = sum(info["divergence_per_layer"]["original_model"])
    assert original >= totals[0] and info["trigger_reached_success"]
    assert set(bna_run.report["phases"]) >= {"detect", "bins", "align_t0"}
    rates = detection_rates(bna_run.model, demo_backdoor["dataset"], demo_backdoor["attack"])
    assert rates["tpr"] > 0.9 and rates["fpr_all"] < 0.15 and rates["fpr_all"] <= rates["fpr"], rates
    # model weights untouched, no gradients left behind
    for (name, p), q in zip(bna_run.model.model.named_parameters(), demo_backdoor["model"].parameters()):
        assert torch.equal(p, q) and p.grad is None, name
    for (name, b), c in zip(bna_run.model.model.named_buffers(), demo_backdoor["model"].buffers()):
        assert torch.equal(b, c), name  # BN running statistics too
    assert not bna_run.model.training


def test_aligned_model_starts_equal_to_the_original(tiny_backdoor):
    """v, ω start at the clean min/max and μ, σ at BN's statistics: g(·|Θ) = f on the clean data."""
    model, clean = tiny_backdoor["model"], tiny_backdoor["clean"]
    sites = find_sites(model, "bn")
    bna, config = BNA(), BNAConfig()
    hooks = _Sites(model, sites)
    layout = bna._clean_layout(model, hooks, clean, config, "cpu")
    wrapped = BNAModel(model, [0], sites, [lo.numel() for lo, _, _ in layout["bins"]], layout["channel_dims"])
    bna._initialise(wrapped.transforms["0"], hooks, layout, sites, model)
    with torch.no_grad():
        torch.testing.assert_close(wrapped.g(clean.x, 0), model(clean.x), atol=1e-4, rtol=1e-4)


def test_gradients_reach_mu_sigma_lower_upper():
    h = BNATransform(3).double()
    with torch.no_grad():
        h.mu.copy_(torch.tensor([0.1, -0.2, 0.3])), h.sigma.copy_(torch.tensor([1.5, 0.7, 1.1]))
        h.lower.fill_(-0.93), h.upper.fill_(1.07)  # clamped outputs off the histogram's bin edges
        h.gamma.copy_(torch.tensor([2.0, 1.0, -0.5])), h.beta.copy_(torch.tensor([0.0, 0.5, 1.0]))
    z = torch.randn(16, 3, 5, 5, dtype=torch.float64) * 2
    out = h(z)
    u = ((z - h.mu.view(1, 3, 1, 1)) / h.sigma.view(1, 3, 1, 1)).clamp(-0.93, 1.07)
    torch.testing.assert_close(out, u * h.gamma.view(1, 3, 1, 1) + h.beta.view(1, 3, 1, 1))
    low = torch.full((3,), -4.0, dtype=torch.float64)
    p = soft_histogram(z.detach() * 0.5, low, 0.1, 80)
    # JS, not TV: TV's gradient at a clamped spike vanishes whenever q > p in every bin around it
    loss = f_divergence(p, soft_histogram(out, low, 0.1, 80), "js").sum()
    loss.backward()
    for name in ("mu", "sigma", "lower", "upper"):
        g = getattr(h, name).grad
        assert g is not None and torch.isfinite(g).all() and (g != 0).all(), (name, g)
    assert h.gamma.grad is None and not h.gamma.requires_grad


def test_inference_rule_on_hand_built_predictions():
    f = torch.tensor([[9.0, 0, 0, 0],   # f says 0 (a detected target), g says 2: flagged, take g
                      [0, 9.0, 0, 0],   # f says 1: not a target, kept without asking g
                      [9.0, 0, 0, 0],   # f says 0, g agrees: kept, not flagged
                      [0, 0, 0, 9.0],   # f says 3 (a detected target), g says 1: flagged
                      [0, 0, 9.0, 0]])  # f says 2: kept
    g_answers = {0: torch.tensor([[0, 0, 5.0, 0], [5.0, 0, 0, 0]]), 3: torch.tensor([[0, 5.0, 0, 0]])}
    asked = []

    def g(rows, t):
        asked.append((t, rows.tolist()))
        return g_answers[t]

    logits, triggered = inference_rule(f, g, [0, 3])
    assert asked == [(0, [0, 2]), (3, [3])]
    assert logits.argmax(1).tolist() == [2, 1, 0, 1, 2]
    assert triggered.tolist() == [True, False, False, True, False]
    torch.testing.assert_close(logits[[1, 2, 4]], f[[1, 2, 4]])


def test_round_trip_gives_identical_outputs_and_flags(demo_backdoor, bna_run, tmp_path):
    for name, draw in bna_run.plots.items():
        assert draw(tmp_path / name) is not False and (tmp_path / name).stat().st_size > 0
    save_repaired(tmp_path, bna_run.model, demo_backdoor["spec"], "bna", bna_run.inserted, bna_run.report,
                  wrapper=bna_run.wrapper)
    loaded = load_repaired(tmp_path)
    x = demo_backdoor["attack"].apply(demo_backdoor["dataset"].x_test[:64])
    x[::2] = demo_backdoor["dataset"].x_test[:64:2]
    with torch.no_grad():
        a, fa = loaded(x, return_flags=True)
        b, fb = bna_run.model(x, return_flags=True)
    assert torch.equal(a, b) and torch.equal(fa, fb) and fa.any() and not fa.all()


def test_pairs_detection_mode_scores_every_class_pair(tiny_backdoor):
    config = BNAConfig(detection="pairs", re_steps=12, re_batch_size=16)
    detection = BNA().detect(tiny_backdoor["model"], tiny_backdoor["clean"], config, progress=False)
    jobs = detection["report"]["triggers"]["perturbation"]["jobs"]
    assert len(jobs) == 90 and {(j["target"], j["sources"][0]) for j in jobs} == {
        (t, s) for t in range(10) for s in range(10) if s != t}
    assert detection["report"]["threshold"] == 7.0 and list(detection["banks"]) == ["perturbation"]
    assert all(math.isfinite(j["size"]) for j in jobs)


def test_inserted_transforms_on_a_model_without_batchnorm():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    with pytest.raises(ValueError, match="no BatchNorm"):
        find_sites(mlp, "bn")
    with pytest.raises(ValueError, match="no module named 9"):
        find_sites(mlp, "1,9")
    sites = find_sites(mlp, "2")
    assert sites == [{"module": "2", "kind": "after"}]
    clean = CleanData(torch.rand(40, 1, 4, 4), torch.arange(40) % 3, 3)
    bank = TriggerBank("patch", [0], [[1, 2]], (1, 4, 4))
    detection = {"targets": [0], "sources": {0: [1, 2]}, "kinds": {0: "patch"}, "banks": {"patch": bank}}
    from pydefend.monitor import PhaseRecorder
    wrapped, mitigation = BNA().mitigate(mlp, clean, sites, detection, BNAConfig(epochs=2, batch_size=16),
                                         PhaseRecorder(), "cpu", False)
    assert mitigation["sites"] == [{"module": "2", "kind": "after", "channels": 12}]
    h = wrapped.transforms["0"][0]
    with torch.no_grad():  # a BN inserted after the ReLU: its fixed affine restores the clean mean and std
        act = mlp[:3](clean.x)
    torch.testing.assert_close(h.beta, act.mean(0))
    torch.testing.assert_close(h.gamma, act.std(0, unbiased=False).clamp_min(1e-5))
    trace = mitigation["targets"]["0"]["epochs"]
    assert len(trace) == 3 and all(math.isfinite(e["total"]) for e in trace)
    with torch.no_grad():  # μ was trained away from the clean mean it started at (random model, random data)
        assert not torch.allclose(h.mu, act.mean(0))


def test_defend_cli_runs_bna(tiny_backdoor, tmp_path, capsys):
    out = tmp_path / "out"
    # a threshold of 0 flags about half the classes: this checks what the CLI writes once BNA has mitigated
    assert main(["defend", "--method", "bna", "--checkpoint", str(tiny_backdoor["path"]), "--set", "re_steps=150",
                 "--set", "epochs=2", "--set", "threshold=0", "--out", str(out), "--quiet"]) == 0
    assert "bna" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["detected_targets"]
    assert set(report["metrics"]["test_time_detection"]) == {"tpr", "fpr", "fpr_all"}
    assert report["plots"] == ["bna_triggers.png", "bna_divergence.png"]
    assert isinstance(load_repaired(out), BNAModel)
    assert main(["defend", "--method", "bna", "--checkpoint", str(tiny_backdoor["path"]), "--set",
                 "trigger=blend"]) == 2
    assert "trigger must be" in capsys.readouterr().err


def test_chunked_reverse_engineering_matches_one_pass(tiny_backdoor):
    """re_max_images bounds memory by accumulating the step's gradient over chunks: same optimisation."""
    from pydefend.defenses.bna import reverse_engineer
    clean = tiny_backdoor["clean"]
    results = []
    for chunk in (1024, 37):
        bank = TriggerBank("patch", list(range(10)), [[s for s in range(10) if s != t] for t in range(10)],
                           (1, 8, 8), seed=3)
        config = BNAConfig(re_steps=6, re_check_every=3, re_max_images=chunk)
        out = reverse_engineer(tiny_backdoor["model"], clean, bank, config, progress=False)
        results.append((bank.mask().detach(), out["success"]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert all(p.grad is None for p in tiny_backdoor["model"].parameters())


class _InPlaceNet(nn.Module):
    """Conv → BN → in-place ReLU, and a BatchNorm1d over (N, C, L): the layouts torchvision-style models use."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True)
        self.bn1d = nn.BatchNorm1d(3)
        self.fc = nn.Linear(3 * 16, 4)

    def forward(self, x):
        h = self.act(self.bn(self.conv(x)))           # BN output overwritten in place by the ReLU
        return self.fc(self.bn1d(h.flatten(2)).flatten(1))  # BatchNorm1d on (N, C=3, L=16)


def _randomised(net):
    with torch.no_grad():
        for bn in (net.bn, net.bn1d):
            bn.running_mean.uniform_(-0.3, 0.3), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        net.bn.bias[0] = -4.0  # channel 0's BN output is all negative: a post-ReLU record would read 0
    return net.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layout_survives_in_place_ops_batchnorm1d_and_float64(dtype):
    net = _randomised(_InPlaceNet()).to(dtype)
    clean = CleanData(torch.rand(48, 1, 4, 4), torch.arange(48) % 4, 4)
    sites = find_sites(net, "bn")
    layout = BNA()._clean_layout(net, _Sites(net, sites), clean, BNAConfig(), "cpu")
    assert layout["channel_dims"] == [1, 1]
    with torch.no_grad():  # the true BN outputs, before the in-place ReLU touches them
        bn_out = net.bn(net.conv(clean.x.to(dtype)))
    torch.testing.assert_close(layout["bins"][0][0], bn_out.transpose(0, 1).flatten(1).amin(1).float())
    assert layout["bins"][0][0][0] < -1 and [lo.numel() for lo, _, _ in layout["bins"]] == [3, 3]
    bank = TriggerBank("patch", [0], [[1, 2, 3]], (1, 4, 4))
    detection = {"targets": [0], "sources": {0: [1, 2, 3]}, "kinds": {0: "patch"}, "banks": {"patch": bank}}
    from pydefend.monitor import PhaseRecorder
    wrapped, mitigation = BNA().mitigate(net, clean, sites, detection, BNAConfig(epochs=1, batch_size=16),
                                         PhaseRecorder(), "cpu", False)
    assert all(math.isfinite(v) for v in mitigation["targets"]["0"]["divergence_per_layer"]["after"])
    x = clean.x[:8].to(dtype)
    with torch.no_grad():
        logits, flags = wrapped(x, return_flags=True)
    assert logits.dtype == dtype and flags.dtype == torch.bool
