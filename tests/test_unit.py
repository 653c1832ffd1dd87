import pytest
import torch
from torch import nn

from pydefend import graph
from pydefend.defenses import UNIT, UNITConfig, CleanData
from pydefend.defenses.unit import AlphaSchedule
from pydefend.metrics import evaluate
from pydefend.models import build_model
from pydefend.repaired import load_repaired, save_repaired



@pytest.fixture(scope="module")
def unit_run(demo_backdoor):
    return UNIT().run(demo_backdoor["model"], demo_backdoor["clean"], UNITConfig(), progress=False)


def test_unit_lowers_asr_and_keeps_accuracy(demo_backdoor, unit_run):
    before = demo_backdoor["before"]
    after = evaluate(unit_run.model, demo_backdoor["dataset"], demo_backdoor["attack"])
    assert after["asr"] < before["asr"] - 0.3, (before, after)
    assert after["acc"] > before["acc"] - 0.05, (before, after)


def test_kept_bounds_are_the_tightest_within_budget(demo_backdoor, unit_run):
    report = unit_run.report
    p0, eps = report["validation_accuracy"]["original"], report["config"]["epsilon"]
    ok = [s for s in report["steps"] if s["val_accuracy"] >= p0 - eps]
    uppers = [m.upper for name, m in unit_run.model.named_modules() if name.startswith("pydefend_sites.")]
    final_l1 = sum(float(u.abs().sum()) for u in uppers)
    if report["best_step"] is None:  # nothing beat σ0
        assert all(s["l1"] >= final_l1 - 1e-3 for s in ok)
    else:
        best = min(ok, key=lambda s: s["l1"])
        assert report["best_step"] == best["step"]
        assert final_l1 == pytest.approx(best["l1"], rel=1e-6)
    assert all(not p.requires_grad for p in unit_run.model.parameters())
    assert all(p.grad is None for p in demo_backdoor["model"].parameters()), "weights must get no gradients"


def test_alpha_schedules():
    paper = AlphaSchedule(UNITConfig())
    assert [paper.update(over) for over in (True, True, False)] == [5e-4, 2.5e-4, 5e-4]

    official = UNITConfig.official()
    assert (official.steps, official.step_unit, official.epsilon, official.betas) == (300, "full", 0.03, (0.5, 0.9))
    s, a0 = AlphaSchedule(official), official.alpha0
    assert [s.update(False) for _ in range(5)] == [a0] * 4 + [2 * a0]  # ×2 after 5 steps within budget
    assert [s.update(True) for _ in range(5)] == [2 * a0] * 4 + [pytest.approx(2 * a0 / 2 ** 1.5)]
    assert [s.update(True) for _ in range(5)][-1] == pytest.approx(2 * a0 / 2 ** 3)  # now below α0
    assert s.update(False) == s.update(False) == pytest.approx(2 * a0 / 2 ** 3)
    s.update(True)  # leaving the budget restarts the count back to α0
    assert [s.update(False) for _ in range(5)] == [pytest.approx(2 * a0 / 2 ** 3)] * 4 + [a0]


class PreActBlockNet(nn.Module):
    """BN before conv, activations through F.relu, as PreAct-ResNet does."""

    def __init__(self):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(1), nn.Conv2d(1, 6, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(6), nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, 10)

    def forward(self, x):
        out = self.conv1(torch.nn.functional.relu(self.bn1(x)))
        out = self.conv2(torch.nn.functional.relu(self.bn2(out)))
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("granularity", ["element", "channel"])
@pytest.mark.parametrize("make", [lambda: PreActBlockNet(), lambda: build_model("vit", 1, 10, (8, 8), width=16,
                                                                                  depth=1, heads=2)],
                         ids=["preact_block", "vit"])
def test_runs_on_preact_block_and_vit(make, granularity):
    model = make().eval()
    clean = CleanData(torch.rand(40, 1, 8, 8), torch.randint(0, 10, (40,)), 10)
    result = UNIT().run(model, clean, UNITConfig(steps=3, batch_size=16, granularity=granularity), progress=False)
    kinds = {s["kind"] for s in result.report["sites"]}
    assert kinds == ({"relu"} if isinstance(model, PreActBlockNet) else {"activation", "attention"})
    assert result.model(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    for site in result.report["sites"]:
        assert len(site["shape"]) == (3 if granularity == "element" and isinstance(model, PreActBlockNet)
                                      else 2 if granularity == "element" else 1)


def test_save_load_round_trip(demo_backdoor, unit_run, tmp_path):
    save_repaired(tmp_path, unit_run.model, demo_backdoor["spec"], "unit", unit_run.inserted, unit_run.report)
    loaded = load_repaired(tmp_path)
    x = demo_backdoor["dataset"].x_test[:64]
    with torch.no_grad():
        assert torch.equal(loaded(x), unit_run.model(x))
    assert (tmp_path / "report.json").exists()


def _mlp_and_data(n=50):
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    return model, CleanData(torch.randn(n, 6), torch.randint(0, 3, (n,)), 3)


def test_full_steps_are_adam_updates_on_the_whole_training_part():
    """Algorithm 1 lines 5-11 for two steps in float64, full batch; pydefend accumulates 7-sample mini-batches."""
    model, clean = _mlp_and_data()
    config = UNITConfig(steps=2, step_unit="full", batch_size=7, epsilon=1.0)  # every step within budget
    result = UNIT().run(model, clean, config, progress=False)
    assert result.report["best_step"] == 2

    train, _ = clean.split(config.val_fraction, config.seed)
    w1, b1, w2, b2 = (p.detach().double() for p in model.parameters())
    h = torch.relu(train.x.double() @ w1.T + b1)
    sigma = (h.mean(0) + 4 * h.var(0, unbiased=False).sqrt()).requires_grad_(True)
    opt = torch.optim.Adam([sigma], lr=config.lr, betas=config.betas)
    alpha = config.alpha0
    for _ in range(2):
        logits = torch.minimum(h, sigma) @ w2.T + b2
        loss = torch.nn.functional.cross_entropy(logits, train.y) + alpha * sigma.abs().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        alpha *= 2  # within budget
    (upper,) = [m.upper for name, m in result.model.named_modules() if name.startswith("pydefend_sites.")]
    torch.testing.assert_close(upper.double(), sigma.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("step_unit, updates_per_step", [("epoch", 3), ("batch", 1), ("full", 1)])
def test_updates_per_step(monkeypatch, step_unit, updates_per_step):
    calls = []
    adam_step = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: calls.append(1) or adam_step(self, *a, **k))
    model, clean = _mlp_and_data(50)  # 40 training samples in mini-batches of 16
    UNIT().run(model, clean, UNITConfig(steps=2, step_unit=step_unit, batch_size=16), progress=False)
    assert len(calls) == 2 * updates_per_step


def test_bad_config():
    with pytest.raises(ValueError, match="granularity"):
        UNITConfig(granularity="layer")
    with pytest.raises(ValueError, match="step_unit"):
        UNITConfig(step_unit="pass")


def test_model_without_activations_is_refused():
    clean = CleanData(torch.rand(10, 4), torch.randint(0, 2, (10,)), 2)
    with pytest.raises(ValueError, match="no activation"):
        UNIT().run(nn.Linear(4, 2), clean, UNITConfig(steps=1), progress=False)


class Branchy(nn.Module):
    """Python control flow on the input: torch.fx cannot trace it, as it cannot trace Hugging Face models."""

    def __init__(self, activation: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)
        self.act = nn.GELU() if activation else nn.Identity()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        h = self.act(self.fc1(x))
        if x.mean() > -10:  # always true, but on a tensor value
            h = h + self.attn(h[:, None], h[:, None], h[:, None])[0][:, 0]
        return self.fc2(torch.relu(h))


def test_untraceable_model_falls_back_to_module_hooks(tmp_path):
    torch.manual_seed(0)
    model = Branchy(activation=True).eval()
    clean = CleanData(torch.randn(40, 4), torch.randint(0, 2, (40,)), 2)
    result = UNIT().run(model, clean, UNITConfig(steps=2, batch_size=16), progress=False)
    assert [(s["node"], s["kind"]) for s in result.report["sites"]] == [("act", "activation"), ("attn", "attention")]
    assert "cannot trace Branchy" in result.report["sites_found_by"]
    assert "F.gelu" in result.report["sites_found_by"]  # says what the hooks cannot reach (the torch.relu)
    assert not model._forward_hooks and not model.act._forward_hooks, "the caller's model gets no hooks"
    x = torch.randn(7, 4)
    bounds = [m.upper for n, m in result.model.named_modules() if n.startswith("pydefend_sites.")]
    with torch.no_grad():
        for upper in bounds:
            upper.fill_(0.05)  # tight: the bounded model must differ from the original
        clipped = result.model(x)
        assert not torch.allclose(clipped, model(x))
        expected_hidden = model.act(model.fc1(x)).clamp(max=0.05)
        attended = model.attn(expected_hidden[:, None], expected_hidden[:, None], expected_hidden[:, None])[0][:, 0]
        expected = model.fc2(torch.relu(expected_hidden + attended.clamp(max=0.05)))
        torch.testing.assert_close(clipped, expected)
    spec = {"source": "python", "name": f"{__file__}:Branchy", "args": {"activation": True}}
    save_repaired(tmp_path, result.model, spec, "unit", result.inserted, result.report)
    loaded = load_repaired(tmp_path, trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), clipped)


def test_untraceable_model_without_activation_modules_is_refused():
    clean = CleanData(torch.rand(10, 4), torch.randint(0, 2, (10,)), 2)
    with pytest.raises(ValueError, match="no activation.*cannot trace Branchy.*not bounded"):
        UNIT().run(Branchy(activation=False), clean, UNITConfig(steps=1, attention=False), progress=False)
