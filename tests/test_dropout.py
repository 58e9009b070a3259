"""fedhf's CPU dropout (issue 19, training speed): the same operation as torch's dropout with a cheaper mask.

Each element is kept with probability 1 - p and scaled by 1 / (1 - p), the gradient is the same mask, the masks
follow torch.manual_seed, and build_model puts it in place of every nn.Dropout of a CPU model (PEFT's lora_dropout
included) without changing what a model saves."""

from __future__ import annotations

import math

import pytest
import torch

from fedhf.config.schema import parse_config
from fedhf.tasks.dropout import CpuDropout, cpu_dropout, use_cpu_dropout
from fedhf.tasks.model import build_model, get_adapter_state


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keeps_each_element_with_probability_one_minus_p_and_scales_the_kept(p: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros in the input: a zero in the output is a dropped element
    out = cpu_dropout(x, p)
    kept = out != 0
    n = x.numel()
    sd = math.sqrt(n * p * (1 - p))
    assert abs(int(kept.sum()) - n * (1 - p)) < 5 * sd
    torch.testing.assert_close(out[kept], x[kept] / (1 - p))
    # neighbouring elements are independent: the share kept among the kept's right neighbours is 1 - p as well
    pairs = kept[:, :-1] & kept[:, 1:]
    assert abs(int(pairs.sum()) / int(kept[:, :-1].sum()) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (n * (1 - p)))


def test_gradient_is_the_mask_scaled() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 33, requires_grad=True)
    out = cpu_dropout(x, 0.25)
    (out * 3).sum().backward()
    expected = torch.where(out != 0, 3 / 0.75, 0.0)
    torch.testing.assert_close(x.grad, expected)


def test_masks_follow_torch_manual_seed_and_differ_between_calls() -> None:
    x = torch.ones(4096)
    torch.manual_seed(7)
    a, b = cpu_dropout(x, 0.5), cpu_dropout(x, 0.5)
    torch.manual_seed(7)
    assert torch.equal(cpu_dropout(x, 0.5), a)
    assert not torch.equal(a, b)


def test_module_is_identity_in_eval_at_p_zero_and_all_zeros_at_p_one() -> None:
    x = torch.randn(8, 16)
    m = CpuDropout(0.3)
    m.eval()
    assert torch.equal(m(x), x)
    assert torch.equal(CpuDropout(0.0)(x), x)
    assert torch.equal(CpuDropout(1.0)(x), torch.zeros_like(x))
    assert torch.equal(cpu_dropout(x, 1.0), torch.zeros_like(x))
    x = torch.rand(64, 64) + 0.5
    y = x.clone()
    out = CpuDropout(0.5, inplace=True)(y)
    dropped = out == 0
    assert out.data_ptr() == y.data_ptr() and 0.4 < float(dropped.float().mean()) < 0.6
    torch.testing.assert_close(out[~dropped], x[~dropped] / 0.5)


def test_bf16_input_keeps_its_dtype() -> None:
    x = (torch.rand(32, 32) + 0.5).to(torch.bfloat16)
    out = cpu_dropout(x, 0.2)
    assert out.dtype == torch.bfloat16
    assert 0.1 < float((out == 0).float().mean()) < 0.3
    assert torch.equal(out[out != 0], (x[out != 0].float() / 0.8).to(torch.bfloat16))


def test_build_model_swaps_every_dropout_and_saves_the_same_state() -> None:
    cfg = parse_config({})
    model = build_model(cfg, ["negative", "positive"], device="cpu")
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is CpuDropout for m in dropouts)
    lora = [m for n, m in model.named_modules() if n.endswith("lora_dropout.default")]
    assert lora and all(type(m) is CpuDropout and m.p == cfg.model.lora.dropout for m in lora)
    plain = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.2), torch.nn.Dropout(0.4, inplace=True))
    plain.eval()
    assert use_cpu_dropout(plain) == 2
    assert [(type(m), m.p, m.inplace, m.training) for m in plain[1:]] == [
        (CpuDropout, 0.2, False, False),
        (CpuDropout, 0.4, True, False),
    ]
    # what travels and what is saved is unchanged: no parameter or buffer was added
    state = get_adapter_state(model)
    assert state and all("dropout" not in k for k in state)
    assert not any("dropout" in k for k in model.state_dict())
