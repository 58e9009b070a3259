"""Differential privacy: Opacus DP-SGD in the client, accounting across rounds, budgets.

One entry point per concern, no Flower here:

- ``plan_noise_multiplier``: sigma for a target epsilon over the whole run.
- ``SampleAccount``: one client's accountant history for the whole run (what Flower keeps in
  the client's ``context.state`` between rounds), its cumulative epsilon, and the epsilon a
  further round would bring (for budgets).
- ``private_train``: wrap model/optimizer/loader with Opacus once, guard against the silent
  failures of Opacus + PEFT, train, and return the updated account.

It fails closed: if DP was asked for and cannot be applied, it raises
:class:`FedHFPrivacyError`; it never falls back to non-private training. DP noise and Poisson
sampling draw from fresh OS randomness, never from the run's seed. They do not come from a
cryptographically secure RNG (Opacus' secure mode needs torchcsprng, which is not available):
the run says so in its privacy section.
"""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader

from fedhf.config.schema import FedHFConfig, PrivacyConfig
from fedhf.errors import FedHFPrivacyError
from fedhf.tasks.base import Task
from fedhf.tasks.device import model_device
from fedhf.train.loop import Pull, TrainResult, make_optimizer, train_local

RNG_NOTE = (
    "DP noise and Poisson sampling draw from torch generators seeded from OS randomness (secrets), never "
    "from the run's seed; torch's generator is not a cryptographically secure RNG (Opacus' secure_mode needs "
    "torchcsprng, which is not installed)."
)
CLIENT_RNG_NOTE = (
    "Client-level noise is added by Flower's DP strategy wrapper with numpy's global generator, "
    "which is not a cryptographically secure RNG."
)
MAX_SIGMA = 100.0


def make_accountant(kind: str) -> RDPAccountant | PRVAccountant:
    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise FedHFPrivacyError(f"unknown accountant '{kind}'; use rdp or prv.")


def epsilon_of(kind: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """Epsilon of a full (sigma, q, steps) history, computed in one go by Opacus' accountant."""
    if not history:
        return 0.0
    acc = make_accountant(kind)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


def default_delta(num_examples: int) -> float:
    """0.1 / n: below 1/n, so the guarantee is not met by releasing one example outright."""
    return 0.1 / max(num_examples, 1)


def sampling(num_examples: int, batch_size: int, local_epochs: int) -> tuple[float, int]:
    """(Poisson sampling rate q, DP-SGD steps per round), as Opacus' DP data loader sets them."""
    batches = math.ceil(num_examples / batch_size)
    return 1.0 / batches, batches * local_epochs


def run_privacy_info(p: PrivacyConfig) -> dict[str, Any] | None:
    """What the run record states of the run's privacy at its start (None without DP): the guarantees asked for,
    the accountant, and what randomness the noise comes from."""
    from fedhf.privacy.ledger import SAMPLE

    if p.mode == "none":
        return None
    info: dict[str, Any] = {"mode": p.mode, "secure_rng": False, "rng": RNG_NOTE if p.sample_level else CLIENT_RNG_NOTE}
    if p.sample_level:
        info.update(
            {
                "label": SAMPLE,
                "accountant": p.accountant,
                "target_epsilon": p.target_epsilon,
                "grad_sample_mode": p.grad_sample_mode,
            }
        )
        if p.client_level:
            info["rng"] = RNG_NOTE + " " + CLIENT_RNG_NOTE
    return info


@dataclass(frozen=True)
class SamplePlan:
    """A client's sample-level DP plan for a run: what it will spend, decided once (by the node, never the server)."""

    sample_rate: float  # Poisson q = 1 / ceil(n / B)
    steps_per_round: int
    total_steps: int  # over the run's rounds
    delta: float
    noise_multiplier: float  # planned for privacy.target-epsilon, else privacy.noise-multiplier


def plan_sample_level(
    num_examples: int,
    *,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    accountant: str,
    target_epsilon: float | None,
    noise_multiplier: float,
    delta: float | None,
    final_epochs: int = 0,
) -> SamplePlan:
    """The one place sigma is planned: for ``target_epsilon`` over every step of the run, else the given sigma.
    ``local_epochs``: a client's epochs per round; ``final_epochs``: its epochs after the last round
    (personalization)."""
    d = delta if delta is not None else default_delta(num_examples)
    q, steps = sampling(num_examples, batch_size, local_epochs)
    total = steps * rounds + sampling(num_examples, batch_size, final_epochs)[1]
    sigma = noise_multiplier
    if target_epsilon is not None:
        sigma = plan_noise_multiplier(target_epsilon, d, q, total, accountant)
    return SamplePlan(q, steps, total, d, sigma)


def dp_epochs(cfg: FedHFConfig) -> tuple[int, int]:
    """(epochs a client trains in a round, epochs it trains after the last round), personal epochs included: every
    one of them is a DP-SGD epoch under sample-level DP, planned and accounted."""
    pers = cfg.personalization
    per_round = cfg.train.local_epochs + (pers.epochs if pers.mode in ("fedrep", "ditto") else 0)
    final = pers.epochs if pers.mode == "finetune" else 0
    if pers.on and pers.local_only:
        final += cfg.num_server_rounds * cfg.train.local_epochs
    return per_round, final


def plan_for(cfg: FedHFConfig, num_examples: int, delta: float | None = None) -> SamplePlan:
    """A client's plan under the run config (``delta``: the one the node settled on, else the config's)."""
    p = cfg.privacy
    per_round, final = dp_epochs(cfg)
    return plan_sample_level(
        num_examples,
        batch_size=cfg.train.batch_size,
        local_epochs=per_round,
        final_epochs=final,
        rounds=cfg.num_server_rounds,
        accountant=p.accountant,
        target_epsilon=p.target_epsilon,
        noise_multiplier=p.noise_multiplier,
        delta=delta if delta is not None else p.delta,
    )


def plan_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str
) -> float:
    """The smallest sigma (to Opacus' tolerance) whose epsilon after ``total_steps`` is <= target."""
    if target_epsilon <= 0:
        raise FedHFPrivacyError(f"privacy.target-epsilon must be > 0, got {target_epsilon}.")
    with warnings.catch_warnings():
        # The search evaluates sigma = 100 and sigma = 20, 40, ... where Opacus' RDP optimum sits at its largest order
        # and it warns that a wider range would be tighter; that concerns only those probes, not the planned sigma
        # (whose epsilon is computed, and warned about if need be, like every other).
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        at_max = epsilon_of(accountant, [(MAX_SIGMA, sample_rate, total_steps)], delta)
        if at_max <= target_epsilon:
            sigma = get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=accountant,
                epsilon_tolerance=0.01 * target_epsilon,
            )
    if at_max > target_epsilon:
        raise FedHFPrivacyError(
            f"privacy.target-epsilon={target_epsilon} is unreachable: even sigma={MAX_SIGMA:g} "
            f"gives epsilon={at_max:.3g} "
            f"after {total_steps} steps at sampling rate {sample_rate:.4g} (delta={delta:.3g}); "
            f"raise privacy.target-epsilon, "
            f"or take fewer steps (num-server-rounds, train.local-epochs) or a smaller sampling rate "
            f"(train.batch-size)."
        )
    return float(sigma)


@dataclass
class SampleAccount:
    """One client's sample-level privacy spend for the whole run."""

    accountant: str
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self.history)

    @property
    def epsilon(self) -> float:
        return epsilon_of(self.accountant, self.history, self.delta)

    def epsilon_after(self, sample_rate: float, steps: int) -> float:
        """What epsilon would be after one more round of ``steps`` at ``sample_rate``."""
        return epsilon_of(
            self.accountant, _merge(self.history, (self.noise_multiplier, sample_rate, steps)), self.delta
        )

    def to_state(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant,
            "delta": self.delta,
            "noise-multiplier": self.noise_multiplier,
            "max-grad-norm": self.max_grad_norm,
            "history-sigma": [float(h[0]) for h in self.history],
            "history-q": [float(h[1]) for h in self.history],
            "history-steps": [int(h[2]) for h in self.history],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> SampleAccount:
        history = list(zip(state["history-sigma"], state["history-q"], state["history-steps"], strict=True))
        return cls(
            str(state["accountant"]),
            float(state["delta"]),
            float(state["noise-multiplier"]),
            float(state["max-grad-norm"]),
            [(float(s), float(q), int(n)) for s, q, n in history],
        )


def _merge(history: list[tuple[float, float, int]], entry: tuple[float, float, int]) -> list[tuple[float, float, int]]:
    """Append a (sigma, q, steps) entry, merging with the last one when sigma and q are equal (as Opacus does)."""
    out = list(history)
    if out and out[-1][0] == entry[0] and out[-1][1] == entry[1]:
        out[-1] = (entry[0], entry[1], int(out[-1][2]) + int(entry[2]))
    else:
        out.append(entry)
    return out


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` (where the noise is drawn: the model's) seeded from OS randomness: never from the
    run's seed."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def check_opacus_compatible(model: torch.nn.Module) -> None:
    """Fail before training when Opacus cannot compute per-example gradients for a trainable module."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        names = "; ".join(str(e).splitlines()[0][:160] for e in errors[:3])
        raise FedHFPrivacyError(
            f"differential privacy cannot be applied to this model: {names}. "
            f"Replace or freeze those modules (e.g. BatchNorm -> GroupNorm/LayerNorm)."
        )


@dataclass
class PrivateResult:
    train: TrainResult
    account: SampleAccount
    empty_batches: int


_HOOK_ON_OUTPUTS = "Full backward hook is firing when gradients are computed with respect to module outputs"


def private_train(
    model: torch.nn.Module,
    loader: DataLoader,
    account: SampleAccount,
    *,
    task: Task,
    epochs: int,
    lr: float,
    weight_decay: float = 0.0,
    grad_sample_mode: str = "hooks",
    optimizer_name: str = "adamw",
    momentum: float = 0.0,
    pull: Pull | None = None,
) -> PrivateResult:
    """DP-SGD (Poisson sampling, per-example clipping at C, Gaussian noise sigma*C) for ``epochs`` epochs.

    The accountant starts from ``account.history`` (earlier rounds), so the epsilon it reports
    covers the whole run. Raises FedHFPrivacyError when DP cannot be applied.
    """
    if loader.batch_size is None:  # a bug in the caller: DP-SGD's batches are Poisson samples of the rows
        raise FedHFPrivacyError(
            "DP-SGD needs a loader with a batch size (it draws its own Poisson batches of the rows), not one with a "
            "batch sampler such as length buckets."
        )
    model.train()
    check_opacus_compatible(model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise FedHFPrivacyError("the model has no trainable parameters; nothing to train privately.")
    optimizer = make_optimizer([p for _, p in trainable], optimizer_name, lr, weight_decay, momentum)
    engine = PrivacyEngine(accountant=account.accountant, secure_mode=False)
    engine.accountant.history = [tuple(h) for h in account.history]
    # Poisson sampling (each example joins each batch with probability q) from a fresh generator: it
    # must not follow the run's seed. Built here rather than by Opacus so that an empty batch, even the
    # first one, reaches the training loop as an empty batch (Opacus' own empty-batch collate cannot
    # rebuild dict batches when the first batch is empty).
    num_examples = len(loader.dataset)
    poisson = poisson_loader(loader.dataset, loader.collate_fn, loader.batch_size)
    try:
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=task.criterion(),
            data_loader=poisson,
            noise_multiplier=account.noise_multiplier,
            max_grad_norm=account.max_grad_norm,
            poisson_sampling=False,
            noise_generator=fresh_generator(model_device(model)),
            grad_sample_mode=grad_sample_mode,
        )
    except FedHFPrivacyError:
        raise
    except Exception as exc:  # Opacus raises several types for unsupported layers and modes
        raise FedHFPrivacyError(
            f"Opacus cannot make this model private ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})."
        ) from None
    # make_private returns 4 values in ghost mode (with the criterion that does the clipping), else 3.
    if len(made) == 4:
        dp_model, dp_optimizer, criterion, dp_loader = made
    else:
        (dp_model, dp_optimizer, dp_loader), criterion = made, task.criterion()
    guard = _Guard(trainable, grad_sample_mode)
    with warnings.catch_warnings():
        # A trainable layer whose input needs no gradient (FFA-LoRA's B after the frozen A, a head on a frozen
        # encoder): torch says its full backward hook sees only the output's gradient, which is all Opacus reads.
        warnings.filterwarnings("ignore", message=_HOOK_ON_OUTPUTS, category=UserWarning, module=r"fedhf\.train\.loop")
        result = train_local(
            dp_model,
            dp_loader,
            task=task,
            epochs=epochs,
            lr=lr,
            optimizer=dp_optimizer,
            criterion=criterion,
            before_step=guard.before_step,
            after_step=guard.after_step,
            empty_batch=guard.empty_batch,
            pull=pull,
        )
    if guard.steps == 0:
        raise FedHFPrivacyError("no DP-SGD step was taken; check the partition size and train.batch-size.")
    history = [tuple(h) for h in engine.accountant.history]
    new_account = SampleAccount(
        account.accountant,
        account.delta,
        account.noise_multiplier,
        account.max_grad_norm,
        [(float(s), float(q), int(n)) for s, q, n in history],
    )
    if new_account.steps != account.steps + guard.steps:
        raise FedHFPrivacyError(
            f"the accountant counted {new_account.steps - account.steps} steps but {guard.steps} were taken."
        )
    # What was realised must be exactly what was planned and reserved: q and steps as sampling() says.
    q, steps = sampling(num_examples, loader.batch_size, epochs)
    expected = _merge(account.history, (account.noise_multiplier, q, steps))
    if new_account.history != expected:
        raise FedHFPrivacyError(
            f"the accountant recorded {new_account.history[-1]} for this round, not the planned "
            f"(sigma {account.noise_multiplier}, q {q}, {steps} steps); the spend is not what was checked."
        )
    _unwrap_hooks(dp_model)
    return PrivateResult(result, new_account, guard.empty)


def poisson_loader(dataset: Any, collate_fn: Any, batch_size: int) -> DataLoader:
    """Poisson-sampled batches, exactly as :func:`sampling` plans them: q = 1 / ceil(n / B), ceil(n / B) per epoch.

    Opacus' sampler would take int(1 / q) batches, which float rounding makes one fewer for many n
    (n = 1488, B = 16: 92, not 93), and its accountant then books q = 1 / 92: a realised epsilon above
    the planned one. The steps are set explicitly, so Opacus books q = 1 / len(loader) = the planned q.
    """
    num_examples = len(dataset)
    sample_rate, steps = sampling(num_examples, batch_size, 1)
    sampler = UniformWithReplacementSampler(
        num_samples=num_examples, sample_rate=sample_rate, steps=steps, generator=fresh_generator()
    )
    return DataLoader(dataset, collate_fn=_empty_safe(collate_fn), batch_sampler=sampler)


def _empty_safe(collate: Any) -> Any:
    def wrapped(batch: list[Any]) -> Any:
        return {} if len(batch) == 0 else collate(batch)

    return wrapped


def _unwrap_hooks(dp_model: torch.nn.Module) -> None:
    """Remove Opacus' hooks so the (shared) inner model can be evaluated or saved normally."""
    remove = getattr(dp_model, "_close", None)
    if callable(remove):
        remove()


class _Guard:
    """Checks that DP is really applied: per-example gradients for every trainable tensor; weights move."""

    def __init__(self, trainable: list[tuple[str, torch.nn.Parameter]], mode: str) -> None:
        self.trainable = trainable
        self.mode = mode
        self.steps = 0
        self.empty = 0
        self._before: list[torch.Tensor] | None = None

    def before_step(self) -> None:
        if self.steps == 0:
            if self.mode != "ghost":  # ghost clipping never materialises per-example gradients
                missing = [n for n, p in self.trainable if getattr(p, "grad_sample", None) is None]
                if missing:
                    raise FedHFPrivacyError(
                        f"no per-example gradient for {len(missing)} trainable tensor(s), e.g. '{missing[0]}'; "
                        f"DP cannot be applied to them. Freeze them or use a module Opacus supports."
                    )
            self._before = [p.detach().clone() for _, p in self.trainable]

    def after_step(self) -> None:
        if self.steps == 0 and self._before is not None:
            lora = [(n, b) for (n, _), b in zip(self.trainable, self._before, strict=True) if "lora_" in n]
            check = lora or [(n, b) for (n, _), b in zip(self.trainable, self._before, strict=True)]
            params = dict(self.trainable)
            if all(torch.equal(params[n].detach(), b) for n, b in check):
                raise FedHFPrivacyError(
                    "the first private step left every LoRA weight unchanged; Opacus is not "
                    "updating the adapter (was the model wrapped before LoRA, or on another device?)."
                )
            self._before = None
        self.steps += 1

    def empty_batch(self) -> None:
        """A Poisson batch with no example: still a step (the accountant counts it), noise only."""
        for _, p in self.trainable:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.empty += 1


# ----------------------------------------------------------------------------- client level


def effective_client_sigma(noise_multiplier: float, clipped_count_stddev: float | None) -> float:
    """Noise multiplier of one round's release as a single Gaussian mechanism.

    Fixed clipping releases the noisy average only: sigma itself. Adaptive clipping also
    releases a noisy count of clipped updates (sensitivity 1, noise std ``clipped_count_stddev``);
    composing the two Gaussian mechanisms gives (sigma^-2 + std^-2)^(-1/2). This bound holds
    whatever the count's exact sensitivity is (<= 1), so it never under-reports.
    """
    if clipped_count_stddev is None:
        return noise_multiplier
    return (noise_multiplier**-2 + clipped_count_stddev**-2) ** -0.5


@dataclass
class ClientLevelAccount:
    """The federation's client-level (per participant) privacy spend, one release per round."""

    noise_multiplier: float  # effective, per round
    delta: float
    history: list[tuple[float, float, int]] = field(default_factory=list)  # (sigma, q = sampled / population, rounds)

    def add_round(self, sample_rate: float) -> None:
        self.history = _merge(self.history, (self.noise_multiplier, sample_rate, 1))

    @property
    def rounds(self) -> int:
        return sum(int(h[2]) for h in self.history)

    @property
    def epsilon(self) -> float:
        """Subsampled Gaussian (RDP) with q = clients sampled / clients in the federation."""
        return epsilon_of("rdp", self.history, self.delta)

    @property
    def epsilon_no_amplification(self) -> float:
        """The same releases without amplification by sampling (q = 1): holds for any way of picking clients."""
        return epsilon_of("rdp", [(self.noise_multiplier, 1.0, self.rounds)], self.delta) if self.history else 0.0
