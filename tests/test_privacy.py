"""Sample-level DP: accounting across rounds, planning, clipping, fresh noise, fail-closed guards."""

from __future__ import annotations

import datasets
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from fedhf.config.schema import parse_config
from fedhf.privacy.dp import (
    FedHFPrivacyError,
    SampleAccount,
    _Guard,
    check_opacus_compatible,
    default_delta,
    epsilon_of,
    plan_noise_multiplier,
    private_train,
    sampling,
)
from fedhf.tasks.model import build_model, get_adapter_state, load_tokenizer, set_adapter_state
from fedhf.tasks.text_classification import TextClassification, make_loader
from fedhf.train.loop import train_local

from .conftest import synthetic_rows

TASK = TextClassification()

LABELS = ["negative", "positive"]


def rows(n, seed=0):
    r = synthetic_rows(n, seed=seed)
    return datasets.Dataset.from_dict(
        {"text": [x["text"] for x in r], "label": [int(x["label"] == "positive") for x in r]}
    )


@pytest.fixture()
def tiny(tiny_model_dir):
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    return cfg, load_tokenizer(cfg.model.name)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_history_epsilon_equals_opacus_in_one_go(kind):
    acc = SampleAccount(kind, 1e-5, 1.0, 1.0)
    history = []
    eps = []
    for _ in range(3):  # three rounds of 25 steps, composed across rounds
        history.append((1.0, 0.04, 25))
        acc = SampleAccount(kind, 1e-5, 1.0, 1.0, [(1.0, 0.04, sum(h[2] for h in history))])
        eps.append(acc.epsilon)
    assert eps[0] < eps[1] < eps[2]
    ref = RDPAccountant() if kind == "rdp" else PRVAccountant()
    ref.history = [(1.0, 0.04, 75)]
    assert eps[2] == pytest.approx(ref.get_epsilon(delta=1e-5), rel=1e-6)
    assert SampleAccount.from_state(acc.to_state()) == acc


def test_planning_a_small_epsilon_is_quiet_and_plans_what_opacus_plans():
    """Opacus warns "Optimal order is the largest alpha" for the search's large-sigma probes (sigma 20, 100): noise on
    every client's console at small targets. The planner keeps it out, and plans exactly Opacus' sigma."""
    import warnings

    from opacus.accountants.utils import get_noise_multiplier

    q, steps, delta = sampling(960, 64, 4)[0], 180, 0.1 / 960
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = plan_noise_multiplier(1.0, delta, q, steps, "rdp")
    ref = get_noise_multiplier(
        target_epsilon=1.0, target_delta=delta, sample_rate=q, steps=steps, accountant="rdp", epsilon_tolerance=0.01
    )
    assert sigma == ref and 3.0 < sigma < 3.6
    assert 0.99 <= epsilon_of("rdp", [(sigma, q, steps)], delta) <= 1.0
    with warnings.catch_warnings(record=True) as seen:  # outside the planner, Opacus' warning is left alone
        warnings.simplefilter("always")
        epsilon_of("rdp", [(100.0, q, steps)], delta)
    assert any("Optimal order is the largest alpha" in str(w.message) for w in seen)


def test_epsilon_after_projects_one_more_round():
    acc = SampleAccount("rdp", 1e-5, 1.0, 1.0, [(1.0, 0.04, 25)])
    assert acc.epsilon_after(0.04, 25) == pytest.approx(epsilon_of("rdp", [(1.0, 0.04, 50)], 1e-5), rel=1e-9)
    assert acc.epsilon_after(0.04, 25) > acc.epsilon


@pytest.mark.parametrize(("target", "kind"), [(8.0, "rdp"), (4.0, "rdp"), (1.0, "rdp"), (8.0, "prv")])
def test_planned_sigma_meets_the_target_within_ten_percent(target, kind):
    q, steps = sampling(400, 16, 2)
    delta = default_delta(400)
    sigma = plan_noise_multiplier(target, delta, q, steps * 3, kind)
    achieved = epsilon_of(kind, [(sigma, q, steps * 3)], delta)
    assert 0.9 * target <= achieved <= target


def test_unreachable_target_names_the_knobs():
    with pytest.raises(
        FedHFPrivacyError, match="unreachable.*raise privacy.target-epsilon.*num-server-rounds.*train.batch-size"
    ):
        plan_noise_multiplier(0.001, 0.01, 1.0, 60, "rdp")


def test_default_delta_is_below_one_over_n():
    assert default_delta(400) < 1 / 400


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_clipping_bounds_the_per_example_gradient(tiny, monkeypatch, pooling):
    """One example, q = 1, sigma = 0: the gradient the optimizer applies is that example's clipped gradient.

    With model.pooling = mean too: the pooling hook sits between Opacus' per-sample hooks and must not break them.
    """
    cfg, tok = tiny
    cfg = parse_config({**cfg.to_flat(), "model.pooling": pooling})
    norms = []
    original = _Guard.after_step

    def record(self):
        norms.append(torch.sqrt(sum((p.grad**2).sum() for _, p in self.trainable)).item())
        original(self)

    monkeypatch.setattr(_Guard, "after_step", record)
    for clip in (1e-3, 1e3):
        model = build_model(cfg, LABELS)
        loader = make_loader(rows(1), tok, 32, 4, shuffle=False)
        private_train(model, loader, SampleAccount("rdp", 1e-3, 0.0, clip), task=TASK, epochs=3, lr=1e-3)
    small, large = norms[:3], norms[3:]
    assert all(n <= 1e-3 * (1 + 1e-4) for n in small) and max(small) > 0.99e-3  # clipped to C
    assert all(1e-3 < n < 1e3 for n in large)  # below a large C: not clipped


def test_dp_update_differs_from_plain_and_noise_is_fresh(tiny):
    cfg, tok = tiny
    start = get_adapter_state(build_model(cfg, LABELS))

    def update(private: bool):
        torch.manual_seed(0)
        model = build_model(cfg, LABELS)
        set_adapter_state(model, start)
        loader = make_loader(rows(8), tok, 32, 8, shuffle=False)
        if private:
            private_train(model, loader, SampleAccount("rdp", 1e-3, 1.0, 1.0), task=TASK, epochs=1, lr=1e-2)
        else:
            train_local(model, loader, task=TASK, epochs=1, lr=1e-2)
        return torch.cat([v.flatten() for v in get_adapter_state(model).values()])

    plain, dp1, dp2 = update(False), update(True), update(True)
    assert not torch.allclose(plain, dp1)
    assert not torch.allclose(dp1, dp2)  # same seed, different noise


def test_empty_poisson_batches_are_noise_only_steps(tiny):
    cfg, tok = tiny
    model = build_model(cfg, LABELS)
    loader = make_loader(rows(40), tok, 32, 1, shuffle=False)  # q = 1/40: about a third of batches are empty
    res = private_train(model, loader, SampleAccount("rdp", 1e-3, 1.0, 1.0), task=TASK, epochs=1, lr=1e-3)
    assert res.train.steps == 40 and res.account.steps == 40
    assert res.empty_batches > 0
    assert res.account.history == [(1.0, 1 / 40, 40)]


def test_ghost_clipping_really_clips(tiny):
    "q = 1 and sigma = 0 make the batch and noise fixed: ghost and hooks give the same clipped update, plain differs."
    cfg, tok = tiny
    start = get_adapter_state(build_model(cfg, LABELS))

    def update(mode):
        model = build_model(cfg, LABELS)
        set_adapter_state(model, start)
        torch.manual_seed(1)  # the same dropout masks in every variant
        loader = make_loader(rows(4), tok, 32, 4, shuffle=False)
        if mode == "plain":
            train_local(model, loader, task=TASK, epochs=1, lr=1e-2)
        else:
            private_train(
                model,
                loader,
                SampleAccount("rdp", 1e-3, 0.0, 1e-4),
                task=TASK,
                epochs=1,
                lr=1e-2,
                grad_sample_mode=mode,
            )
        return torch.cat([v.flatten() for v in get_adapter_state(model).values()])

    hooks, ghost, plain = update("hooks"), update("ghost"), update("plain")
    assert torch.allclose(hooks, ghost, atol=1e-6)
    assert not torch.allclose(hooks, plain, atol=1e-6)


def test_fail_closed_on_a_layer_opacus_cannot_handle():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with pytest.raises(FedHFPrivacyError, match="BatchNorm"):
        check_opacus_compatible(model)

    class Wrapped(torch.nn.Module):  # behaves like an HF model for train_local
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.net(input_ids.float()[:, :4])})()

    data = [{"input_ids": [1, 2, 3, 4], "attention_mask": [1, 1, 1, 1], "labels": 0}] * 4
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    w = Wrapped()
    before = [p.detach().clone() for p in w.parameters()]
    with pytest.raises(FedHFPrivacyError):
        private_train(w, loader, SampleAccount("rdp", 1e-3, 1.0, 1.0), task=TASK, epochs=1, lr=1e-2)
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, w.parameters(), strict=True))  # nothing trained


def test_first_batch_empty_is_still_a_step(tiny, monkeypatch):
    """Opacus' own empty-batch collate cannot rebuild dict batches when the very first batch is empty."""
    cfg, tok = tiny
    seed = next(
        s for s in range(1000) if not (torch.rand(20, generator=torch.Generator().manual_seed(s)) < 1 / 20).any()
    )
    monkeypatch.setattr("fedhf.privacy.dp.fresh_generator", lambda device="cpu": torch.Generator().manual_seed(seed))
    model = build_model(cfg, LABELS)
    res = private_train(
        model,
        make_loader(rows(20), tok, 32, 1, shuffle=False),
        SampleAccount("rdp", 1e-3, 1.0, 1.0),
        task=TASK,
        epochs=1,
        lr=1e-3,
    )
    assert res.empty_batches >= 1 and res.account.steps == 20


def test_per_sample_gradients_are_right_with_mean_pooling(tiny):
    """Opacus' per-example gradients (hooks mode) through the mean-pooling hook equal one-example autograd gradients,
    for the head and for a LoRA matrix, in a padded batch of unequal lengths."""
    from opacus import GradSampleModule

    cfg, tok = tiny
    cfg = parse_config({**cfg.to_flat(), "model.pooling": "mean", "model.lora.dropout": 0.0})
    texts = ["a good film", "a much longer and rather dull film about nothing", "bad"]
    labels = torch.tensor([1, 0, 0])
    model = build_model(cfg, LABELS)
    with torch.no_grad():  # LoRA B starts at zero: make the LoRA path live so its gradients are not trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    for m in model.modules():  # train mode (Opacus records activations only in training) without dropout noise
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.train()
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    enc = tok(texts, padding=True, return_tensors="pt")
    torch.nn.functional.cross_entropy(gsm(**enc).logits, labels, reduction="sum").backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    names = [next(n for n in trainable if "lora_A" in n), *[n for n in trainable if "classifier" in n]]
    assert len(names) == 3  # a LoRA matrix, the head's weight and bias
    params = dict(model.named_parameters())
    batched = {n: params[n].grad_sample.clone() for n in names}
    for i, text in enumerate(texts):
        model.zero_grad(set_to_none=True)
        one = tok([text], return_tensors="pt")
        torch.nn.functional.cross_entropy(model(**one).logits, labels[i : i + 1], reduction="sum").backward()
        for n in names:
            assert torch.allclose(batched[n][i], params[n].grad, atol=1e-5), n


def test_the_poisson_loader_takes_exactly_the_planned_steps_over_a_large_grid():
    """Opacus' sampler alone takes int(1 / q) batches, one fewer than planned for many n (n = 1488, B = 16: 92 of 93),
    and books q = 1 / 92. fedhf's loader takes ceil(n / B) and books the planned q, bit for bit."""
    from fedhf.privacy.dp import poisson_loader

    off_by_one = 0
    for n in range(1, 3001, 7):
        for batch in (1, 3, 8, 16, 32, 64, 100, 256):
            q, steps = sampling(n, batch, 1)
            loader = poisson_loader(list(range(n)), None, batch)
            assert len(loader) == steps and 1 / len(loader) == q, (n, batch)
            off_by_one += int(1 / q) != steps
    assert off_by_one > 50  # the trap is real on this grid
    q, steps = sampling(1488, 16, 1)
    assert (steps, int(1 / q)) == (93, 92)


@pytest.mark.parametrize(
    ("n", "batch", "epochs"), [(7, 1, 2), (93, 1, 1), (150, 16, 2), (31, 4, 1), (50, 8, 3), (1488, 16, 1)]
)
def test_realised_epsilon_never_exceeds_the_plan_or_the_target(tiny, n, batch, epochs):
    """Plan sigma for a target over two rounds, train two real private rounds, and compare the accountant's own
    record with the plan: realised = planned (same q, same steps), and <= the target."""
    cfg, tok = tiny
    target, delta = 3.0, default_delta(n)
    q, steps = sampling(n, batch, epochs)
    sigma = plan_noise_multiplier(target, delta, q, 2 * steps, "rdp")
    planned = epsilon_of("rdp", [(sigma, q, 2 * steps)], delta)
    account = SampleAccount("rdp", delta, sigma, 1.0)
    model = build_model(cfg, LABELS)
    for _ in range(2):
        loader = make_loader(rows(n), tok, 16, batch, shuffle=False)
        account = private_train(model, loader, account, task=TASK, epochs=epochs, lr=1e-3).account
    assert account.history == [(sigma, q, 2 * steps)]
    realised = account.epsilon
    assert realised == pytest.approx(planned, rel=1e-12) and realised <= target


def test_one_plan_for_the_cli_the_preflight_and_the_client():
    from fedhf.config.schema import parse_config
    from fedhf.privacy.dp import plan_for, plan_sample_level

    cfg = parse_config(
        {
            "privacy.mode": "sample",
            "privacy.target-epsilon": 4.0,
            "num-server-rounds": 3,
            "train.batch-size": 16,
            "train.local-epochs": 2,
        }
    )
    plan = plan_for(cfg, 360)
    assert (plan.sample_rate, plan.steps_per_round, plan.total_steps) == (1 / 23, 46, 138)
    assert plan.delta == default_delta(360)
    eps = epsilon_of("rdp", [(plan.noise_multiplier, plan.sample_rate, plan.total_steps)], plan.delta)
    assert 0.95 * 4.0 <= eps <= 4.0
    assert plan == plan_sample_level(
        360,
        batch_size=16,
        local_epochs=2,
        rounds=3,
        accountant="rdp",
        target_epsilon=4.0,
        noise_multiplier=1.0,
        delta=None,
    )
    fixed = plan_for(parse_config({"privacy.mode": "sample", "privacy.noise-multiplier": 0.7}), 360, delta=1e-4)
    assert fixed.noise_multiplier == 0.7 and fixed.delta == 1e-4
