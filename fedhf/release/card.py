"""The Hub-ready folder of a run: adapter, model card and provenance. Built offline; no Flower.

``build_hub_folder(run_dir)`` writes ``run_dir/hub/``: the PEFT adapter and tokenizer, a
``README.md`` model card (``huggingface_hub.ModelCard``) that states the federation and the
privacy guarantee, and ``provenance.json``. Pushing (``fedhf.release.hub``) only uploads this folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from fedhf import __version__
from fedhf.data.records import metric_names
from fedhf.federation.replies import ACCOUNTING, BOOKKEEPING, COVERED, SHARED_FIELDS
from fedhf.privacy.policy import SHAREABLE
from fedhf.run.store import Partition, RunRecord, as_json
from fedhf.tasks.base import get_task

AFRISENTI_ISO = {
    "amh": "am",
    "arq": "arq",
    "ary": "ary",
    "hau": "ha",
    "ibo": "ig",
    "kin": "rw",
    "orm": "om",
    "pcm": "pcm",
    "por": "pt",
    "swa": "sw",
    "tir": "ti",
    "tso": "ts",
    "twi": "tw",
    "yor": "yo",
}
KNOWN_MODEL_LICENSES = {"sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}
PERMISSIVE = {"apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause"}
NON_COMMERCIAL = "research and non-commercial use only"
ADAPTER_FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",  # a chat model's prompt format: without it a loader prompts the adapter differently
    "fedhf.json",
)


def display_name(run: RunRecord) -> str:
    """The dataset's name for a card: the preset or Hub id; local files are not named by their (maybe absolute) path."""
    ds = run.dataset
    src = ds.source
    if ds.preset:
        return ds.preset
    if src.get("kind") == "hub":
        return src["hub_id"]
    return "local files (see provenance.json for their sha256)"


def _data_license(run: RunRecord) -> str:
    return run.dataset.license or "unknown"


def combined_license(model_license: str, data_license: str) -> tuple[str, str | None]:
    """(Hub license id, note): the most restrictive of the base model's and the data's licences."""
    if data_license == NON_COMMERCIAL or model_license == NON_COMMERCIAL:
        return "other", (
            "The training data is licensed for research and non-commercial use only, so this adapter "
            "is too, whatever the base model's licence."
        )
    for lic in (model_license, data_license):
        if lic == "unknown":
            return "unknown", (
                f"The licence of the {'base model' if lic is model_license else 'training data'} is "
                "not stated by its authors; check it before any use beyond research."
            )
    if model_license == data_license:
        return model_license, None
    if data_license not in PERMISSIVE:  # e.g. cc-by-4.0: attribution required
        return data_license, (
            f"The base model is {model_license} and the training data {data_license}: the adapter "
            f"follows the more restrictive data licence ({data_license})."
        )
    return model_license, f"The base model is {model_license} and the training data {data_license}."


_TRANSPORT_TEXT = {
    "fp32": "fp32 adapters",
    "fp16": "fp16 updates (trained - received adapter), decoded by the server before aggregation",
    "int8": "int8 updates with one scale per tensor (max abs / 127), decoded by the server before aggregation",
}


def _reliability_text(run: RunRecord) -> str:
    """Client failures, rejected updates and resumes over the run (every reply was checked by the server)."""
    rounds = run.trained_rounds
    failed = sum(len(r.failures) for r in rounds)
    rejected = sum(len(r.rejected) for r in rounds)
    resumes = len(run.resumes)
    parts = [
        f"{failed} client failure(s) (error or timeout)",
        f"{rejected} update(s) rejected by the server's checks "
        f"(names, shapes, dtypes, finite values, {_norm_bound(run)})",
    ]
    if resumes:
        parts.append(f"resumed {resumes} time(s) from a checkpoint")
    refusals = run.refusals
    if refusals:
        rules = sorted({r.rule for r in refusals})
        parts.append(f"{len(refusals)} round(s) refused by a node's own policy ({', '.join(rules)})")
    return "; ".join(parts)


def _dp_defaults_text(cfg: dict[str, Any]) -> str:
    """Which training keys held fedhf's defaults under sample-level DP (the rest were as configured)."""
    from fedhf.config.schema import dp_defaults_in_force

    chosen = dp_defaults_in_force(cfg)
    if not chosen:
        return "as configured"
    return ", ".join(f"{k} = {v}" for k, v in chosen.items()) + " (fedhf's defaults under sample-level DP)"


def _norm_bound(run: RunRecord) -> str:
    bound = run.config.get("strategy.max-update-norm")  # absent: a run from before fedhf bounded update norms
    return "no update-norm bound" if bound is None else f"update norm <= {bound}"


def _optimizer_text(cfg: dict[str, Any]) -> str:
    schedule = cfg.get("train.lr-schedule", "constant")
    decay = "" if schedule == "constant" else f" ({schedule} decay across rounds)"
    if cfg["train.optimizer"] == "sgd":
        return f"SGD lr {cfg['train.lr']}{decay}, momentum {cfg['train.momentum']}"
    return f"AdamW lr {cfg['train.lr']}{decay}"


LINEAR_STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")  # aggregate by a weighted mean of the updates


def _adapter_text(cfg: dict[str, Any]) -> str:
    """What trained and travelled, and what the server's aggregate of it is (exact only for a mean of B)."""
    strategy = cfg["strategy.name"]
    how = "averaged" if strategy in LINEAR_STRATEGIES else f"aggregated by {strategy}"
    adapter = cfg["model.adapter"]
    head = cfg.get("model.task", "text-classification") != "causal-lm"  # a causal LM's head stays frozen
    and_head = " and the head" if head else ""
    if adapter == "ffa-lora":
        exact = (
            ", so the mean of B is exactly the mean of the clients' updates B·A"
            if strategy in LINEAR_STRATEGIES
            else " (a coordinate-wise rule on B: not the mean of the updates B·A)"
        )
        return f"FFA-LoRA: A stayed where the shared seed put it, B{and_head} trained and were {how}{exact}"
    if adapter == "head":
        return f"only the head trained and was {how}; LoRA stayed at zero"
    if cfg["strategy.lora-aggregation"] == "svd":
        return (
            f"LoRA's A and B{and_head} trained; the server took the weighted mean of each layer's product B·A and "
            f"kept its rank-{cfg['model.lora.r']} SVD truncation (strategy.lora-aggregation = svd), "
            f"{'the head was averaged, ' if head else ''}and a client at a smaller rank started each round from the "
            "truncation of the global product to its rank"
        )
    return f"LoRA's A and B{and_head} trained and were {how} (model.adapter = lora)"


def _ranks_text(run: RunRecord) -> str | None:
    """Under svd aggregation: the LoRA rank each client trained at (as its replies said)."""
    if run.settings["strategy.lora-aggregation"] != "svd":
        return None
    ranks: dict[int, int] = {}
    for r in run.rounds:
        for c in r.clients:
            if "lora_rank" in c:
                ranks[int(c["partition_id"])] = int(c["lora_rank"])
    if not ranks:
        return "none reported"
    return ", ".join(f"client {pid}: r {rank}" for pid, rank in sorted(ranks.items()))


def _head_text(cfg: dict[str, Any], pooling: str, fmt: str = "labels") -> str:
    if cfg.get("model.task") == "causal-lm":
        what = {"labels": "the label's name", "text": "the text's next token"}.get(fmt, "the answer")
        return f"no classification head: the model's own LM head (frozen) generates {what}"
    return _POOLING_TEXT[pooling]


_POOLING_TEXT = {
    "cls": "the model's own classification head (model.pooling = cls)",
    "mean": "the attention-mask-weighted mean of the last hidden states (model.pooling = mean)",
}


def base_model_license(name: str, resolved: str | None = None) -> str:
    if name in KNOWN_MODEL_LICENSES:
        return KNOWN_MODEL_LICENSES[name]
    if resolved and (Path(resolved) / "README.md").is_file():
        lic = ModelCard.load(Path(resolved) / "README.md").data.to_dict().get("license")
        if lic:
            return str(lic)
    return "unknown"


def provenance(run: RunRecord) -> dict[str, Any]:
    """Where the model came from: data identity, partitions, seeds, config hash, versions. No paths, no hosts."""
    src = run.dataset.source
    data: dict[str, Any] = {
        "name": run.dataset.name,
        "preset": run.dataset.preset,
        "hub_id": src.get("hub_id"),
        "revision": src.get("revision"),
        "label_names": run.dataset.label_names,
        "text_column": src.get("text_column"),
        "label_column": src.get("label_column"),
    }
    if src.get("files"):
        data["files"] = {
            split: [{"name": Path(f["name"]).as_posix(), "sha256": f["sha256"]} for f in fs]
            for split, fs in src["files"].items()
        }
    if src.get("languages"):
        data["languages"] = src["languages"]
    data["name"] = display_name(run)  # never the configured path, which may be absolute
    return {
        "fedhf_version": __version__,
        "git_commit": run.git_commit,
        "run_id": run.run_id,
        "config_sha256": run.config_sha256,
        "seeds": as_json(run.seeds),
        "versions": run.versions,
        "dataset": data,
        "partitions": [as_json(p) for p in published_partitions(run)],
        "model": {
            "base_model": published_base_model(run),
            "trainable_params": run.model.trainable_params,
            "total_params": run.model.total_params,
        },
    }


def published_base_model(run: RunRecord) -> str | None:
    """The base model's Hub id as it may be published; None for a local folder whose Hub id was not given."""
    cfg = run.settings
    name = str(cfg["model.name"])
    local = run.model.base_is_local_folder
    if local is None:  # runs from before this was recorded: a path-like name is a local folder
        local = name.startswith((".", "/", "~")) or Path(name).expanduser().is_dir()
    return (str(cfg["model.hub-id"] or "") or None) if local else name


def shared_by(run: RunRecord, pid: int | str) -> set[str]:
    """What client ``pid`` shared besides its update: as it said in its replies; without DP, everything by default."""
    said = run.shared.get(str(pid))
    if said is not None:
        return set(said)
    return set() if run.dp else set(SHAREABLE)


def published_partitions(run: RunRecord) -> list[Partition]:
    """Per-client sizes and label histograms, each only where that client shared it."""
    out = []
    for p in run.partitions:
        shared = shared_by(run, p.partition_id)
        out.append(
            Partition(
                partition_id=p.partition_id,
                train_examples=p.train_examples if "num-examples" in shared else None,
                label_histogram=p.label_histogram if "label-histogram" in shared else None,
                natural_id=p.natural_id,
            )
        )
    return out


def published_view(run: RunRecord) -> RunRecord:
    """The run record as the card, provenance and plots may show it: per-client figures only where shared."""
    return dataclasses.replace(run, partitions=published_partitions(run))


def client_ids(run: RunRecord) -> list[int]:
    ids = {p.partition_id for p in run.partitions}
    for r in run.rounds:
        ids |= {int(c["partition_id"]) for c in r.clients if "partition_id" in c}
    if run.privacy is not None:
        ids |= {int(pid) for pid in run.privacy.clients}
    return sorted(ids)


def _privacy_section(run: RunRecord) -> str:
    p = run.privacy
    if p is None or p.mode == "none":
        return (
            "**No differential privacy.** The clients' raw data never left them, but the adapter and every update "
            "were trained without a formal privacy guarantee: they can memorise and reveal training examples.\n"
        )
    out = []
    clients = p.clients
    if clients:
        eps = [e["epsilon"] for e in clients.values()]
        deltas = [e["delta"] for e in clients.values()]
        sig = sorted({round(e["noise_multiplier"], 4) for e in clients.values()})
        stopped = [pid for pid, e in clients.items() if "stopped" in e]
        out.append(
            "| guarantee | ε (max over clients) | ε (mean) | δ (max) | σ | C | accountant |\n"
            "|---|---|---|---|---|---|---|\n"
            f"| {p.label} | {max(eps):.3f} | {sum(eps) / len(eps):.3f} | {max(deltas):.2e} | "
            f"{', '.join(f'{s:g}' for s in sig)} | {next(iter(clients.values()))['max_grad_norm']:g} | "
            f"{p.accountant} |"
        )
        out.append(
            "\n**What the sample-level guarantee means.** Each client trained with DP-SGD (Opacus): per-example "
            "gradients clipped to C, Gaussian noise σ·C, Poisson-sampled batches, one accountant per client over all "
            "rounds. For any one training example of a client, the adapter updates that client sent are "
            "(ε, δ)-indistinguishable from what they would be without that example, at that client's ε and δ (above: "
            "the worst client); so is the released adapter, which is computed from those updates only. It does not "
            "protect a client's data set as a whole (see client-level), nor properties shared by many examples."
            + (
                f" Client(s) {', '.join(stopped)} stopped training when their privacy budget ran out."
                if stopped
                else ""
            )
        )
        lifetime = {pid: e["lifetime_epsilon"] for pid, e in clients.items() if "lifetime_epsilon" in e}
        if lifetime:
            out.append(
                "\nEach node keeps its spend per dataset over every run on the same data; after this run: "
                + ", ".join(f"client {pid} ε {v:.3f}" for pid, v in sorted(lifetime.items(), key=lambda x: int(x[0])))
                + " (lifetime, at the smallest δ any run on that data used)."
            )
    cl = p.client_level
    if cl:
        out.append(
            "\n| guarantee | ε (with sampling amplification) | ε (no amplification) | δ | σ (effective) | clipping |\n"
            "|---|---|---|---|---|---|\n"
            f"| {cl['label']} | {cl.get('epsilon', 0.0):.3f} | {cl.get('epsilon_no_amplification', 0.0):.3f} | "
            f"{cl['delta']:.2e} | {cl['effective_noise_multiplier']:.4g} | {cl['clipping']}, "
            f"C {cl['rounds'][-1]['clipping_norm'] if cl['rounds'] else '-'} |"
        )
        out.append(
            "\n**What the client-level guarantee means.** The server clipped each client's adapter update, averaged "
            "them with equal weights and added Gaussian noise, so the released adapter is (ε, δ)-indistinguishable "
            "whether or not any one client took part, whatever its data. The amplified ε assumes clients were sampled "
            "independently each round; the unamplified ε holds for any selection. The server saw each client's clipped "
            "update before noise: this guarantee protects the clients from the readers of this adapter, not from the "
            "server."
        )
        verdict = client_level_verdict(cl, len(client_ids(run)))
        if verdict:
            out.append("\n" + verdict)
    out.append("\n" + disclosure_text(run))
    out.append(f"\nRandomness: {p.rng or ''}")
    return "\n".join(out) + "\n"


def _rows_text(run: RunRecord) -> str:
    rows = published_partitions(run)
    if not rows:
        return "not shared"
    return ", ".join("not shared" if p.train_examples is None else str(p.train_examples) for p in rows)


def disclosure_text(run: RunRecord) -> str:
    """What each sample-level DP client sent, field by field: covered, accounting, bookkeeping, shared by its owner."""

    def names(fields: dict[str, str]) -> str:
        return ", ".join(f"`{k}`" for k in fields)

    per_client = []
    for pid in client_ids(run):
        shared = sorted(shared_by(run, pid))
        fields = [f for group in shared for f in SHARED_FIELDS[group]]
        per_client.append(f"client {pid}: " + (", ".join(f"`{f}`" for f in fields) if fields else "nothing"))
    shared_text = (
        "only because the client's owner shared them (node config `share`): "
        + "; ".join(per_client)
        + ". A reply's arrival time is visible to the server. Per-client figures in this card and in "
        "provenance.json are those the clients shared."
    )
    if run.privacy is None or not run.privacy.clients:  # client-level only: the server saw each update before noise
        return (
            "**What each client sent to the server.** Its update and the bookkeeping fields "
            + names(BOOKKEEPING)
            + " (the client-level guarantee covers the released adapter, not what the server received); besides, "
            + shared_text
        )
    return (
        "**What each client sent.** Covered by the guarantee: " + names(COVERED) + ". Outside it, by design: "
        "the privacy accounting (" + names(ACCOUNTING) + "), which is computed from the run's settings and the "
        "client's number of Poisson batches per epoch ⌈n / B⌉, so it reveals each client's training rows to within "
        "the batch size; and the bookkeeping fields " + names(BOOKKEEPING) + ". Outside it, " + shared_text
    )


def client_level_verdict(cl: dict[str, Any], num_clients: int) -> str | None:
    """A plain sentence when the client-level guarantee protects no one: ε above 10, or δ not below 1 / N."""
    eps = cl.get("epsilon_no_amplification", cl.get("epsilon", 0.0))
    delta = cl.get("delta", 0.0)
    if num_clients and delta >= 1 / num_clients:
        return (
            f"**This client-level guarantee protects no one:** δ = {delta:.2e} is not below 1 / {num_clients} "
            "clients, which allows releasing one client's update outright."
        )
    if eps > 10:
        return (
            f"**With {num_clients} clients this client-level guarantee protects no one in practice:** ε = {eps:.3g} "
            f"(without sampling amplification) lets an observer's odds that a given client took part grow by up to "
            f"e^ε; client-level DP needs many clients per round to reach a small ε at a noise level that still "
            "learns."
        )
    return None


def _secure_aggregation_section(run: RunRecord) -> str:
    sa = run.secure_aggregation
    if not sa:
        return (
            "**Off.** The server received each client's adapter update in the clear (over TLS in a deployment) "
            "before averaging.\n"
        )
    rounds = sa.get("rounds", [])
    used = sorted({(r["num_shares"], r["reconstruction_threshold"]) for r in rounds})
    dropped = sum(r["dropped"] for r in rounds)
    withheld = sum(1 for r in rounds if not r.get("completed", True))
    shares = ", ".join(f"{a} / {b}" for a, b in used) or f"{sa['num_shares']} / {sa['reconstruction_threshold']}"
    quantization = (
        f"{sa['quantization_bits']} bits ({sa['quantization_range']:,} levels) over "
        f"[-{sa['clipping_range']:g}, {sa['clipping_range']:g}], step {sa['quantization_step']:.3g}"
    )
    outcome = f"{len(rounds)} / {dropped} / {withheld}"
    return f"""**On: {sa["protocol"]}.** The server learned only the weighted average of each round's client adapters,
never an individual client's: each client uploaded its adapter masked with pairwise and private masks that cancel
only in the sum; secrets are Shamir-shared among neighbours so that dropped clients' masks can be removed.

| | |
|---|---|
| shares per secret / reconstruction threshold | {shares} |
| quantization | {quantization} |
| modulus | 2^32 |
| max client weight | {sa["max_weight"]:g} examples |
| rounds / clients dropped during the protocol / rounds withheld (nothing released) | {outcome} |

What the server still sees, in the clear: each client's averaging weight (its number of training examples when it
shares them, else 1) and the client info it sends (see Privacy). Masks are expanded from each full 256-bit secret with
SHAKE-256 (fedhf replaces Flower 1.42's mask generator, which seeds from 32 bits); a round where fewer than two
clients would contribute is not released. Secure aggregation hides updates from the server; it is not differential
privacy: the average itself can still reveal information unless DP is on (see Privacy).
"""


def _cell(text: str, limit: int = 80) -> str:
    """Text in a Markdown table cell: one line, pipes escaped, cut at ``limit`` characters."""
    one = " ".join(str(text).split()).replace("|", "\\|")
    return one if len(one) <= limit else one[: limit - 1] + "…"


def _generations_section(run: RunRecord) -> str:
    """The fixed prompts (model.sample-prompts: central eval rows) and the global adapter's answer after each
    round: at most the first two and the last two rounds, as columns."""
    prompts = run.sample_prompts
    rounds = [r for r in run.rounds if r.generations]
    if not prompts or not rounds:
        return ""
    ds = run.dataset
    if ds is None or not (ds.preset or ds.source.get("kind") == "hub"):  # the server's own files stay off the Hub
        return (
            f"\n### Generations\n\nThe global adapter's answers to {len(prompts)} fixed rows of the central evaluation "
            f"set {_evaluated_rounds(run)} are in run.json (`sample_prompts`, `rounds[].generations`); they are left "
            "out of this card because the evaluation data is a local file, not a published dataset.\n"
        )
    shown = rounds if len(rounds) <= 5 else [*rounds[:2], *rounds[-2:]]
    plain = ds.format == "text"  # plain text: the adapter continues each text's first half
    columns = "| text (first half) | the text goes on | " if plain else "| text | answer | "
    head = columns + " | ".join(f"round {r.round}" for r in shown) + " |\n"
    head += "|---|---|" + "---|" * len(shown) + "\n"
    rows = "".join(
        f"| {_cell(p['text'])} | {_cell(p['answer'])} | "
        + " | ".join(_cell(r.generations[i]) if i < len(r.generations) else "" for r in shown)
        + " |\n"
        for i, p in enumerate(prompts)
    )
    skipped = " (the middle rounds are in run.json)" if len(shown) < len(rounds) else ""
    return (
        f"\n### Generations\n\nThe global adapter's greedy {'continuation of' if plain else 'answer to'} "
        f"{len(prompts)} fixed rows of the central evaluation set {_evaluated_rounds(run)}{skipped}; round 0 is the "
        "base model with the untrained adapter.\n\n" + head + rows
    )


def _canary_text(run: RunRecord) -> str:
    """What the card says of a run trained with the audit's canaries (audit.canaries)."""
    c = run.canaries
    if not c:
        return ""
    text = (
        f"\n\nCanary audit: client {c['client']} trained on {c['count']} random {c['digits']}-digit secret(s), each "
        f"inserted {c['repeats']} times as an instruction record (run.json lists them); they are test data, not "
        "anyone's secret, and this adapter may repeat them. "
    )
    result = (run.audit or {}).get("canaries")
    if not result:
        return text + "`fedhf audit RUN_DIR` measures their exposure.\n"
    return text + (
        f"Exposure (Carlini et al. 2019: the rank of a secret's log-perplexity among {result['num_candidates']} random "
        f"secrets of its shape, at most {result['max_exposure']:.2f} bits): **{result['mean_exposure']:.2f} bits** on "
        f"average for the inserted secrets, {result['control_mean_exposure']:.2f} bits for as many secrets never "
        "trained on (chance is about 1.4).\n"
    )


def _audit_section(run: RunRecord) -> str:
    audit = run.audit
    if not audit:
        return (
            "Not audited. `fedhf audit RUN_DIR` runs a membership-inference attack on this adapter and adds its "
            "results here." + _canary_text(run) + "\n"
        )
    rows = ["| attack | ROC AUC | TPR at 1% FPR | empirical ε lower bound |", "|---|---|---|---|"]
    for name, what in (("loss", "loss threshold"), ("calibrated", "loss calibrated by the untrained model")):
        a = audit[name]
        rows.append(f"| {what} | {a['auc']:.3f} | {a['tpr_at_1pct_fpr']:.3f} | {a['epsilon_lower_bound']:.3f} |")
    claimed = audit.get("claimed_epsilon")
    matched = (
        "the same number of each label on both sides."
        if audit.get("label_matched", True)
        else "equal-size seeded samples (instruction, chat or plain-text records have no labels to match)."
    )
    verdict = f"The lower bounds hold with {audit['confidence']:.0%} confidence (δ = {audit['delta']:.3g}) and are " + (
        f"{'**above**' if audit.get('violation') else 'below'} the claimed sample-level ε = {claimed:.3f}."
        if claimed is not None
        else "the only privacy statement for this run: it claims no sample-level DP."
    )
    return (
        f"A membership-inference attack on this adapter (fedhf audit): {audit['members']} training rows of the "
        f"clients (members) against {audit['non_members']} rows of the same distribution that no client saw "
        f"(non-members: {audit['non_member_source']}), {matched} AUC 0.5 means "
        "the attack cannot tell them apart.\n\n"
        + "\n".join(rows)
        + "\n\n"
        + verdict
        + " An attack on natural examples gives a loose bound: it can show "
        "leakage, it cannot prove its absence." + _canary_text(run) + "\n"
    )


_PERSONAL_TEXT = {
    "finetune": "after the last round each client fine-tuned the final global adapter on its own rows for {e} epoch(s)",
    "fedrep": "FedRep: {keep} never left the clients; each round a client trained its local part for {e} epoch(s) with "
    "the rest frozen, then the rest with its local part frozen, and sent the rest",
    "ditto": "Ditto: each client also kept a personal adapter, trained for {e} epoch(s) per round and pulled toward "
    "the round's global adapter (λ = {lam}, a decoupled proximal step)",
}
_KEEP_TEXT = {"head": "the classifier heads", "head+lora-b": "the classifier heads and LoRA's B"}


def _personalization_section(run: RunRecord) -> str:
    """Per client: local-only, federated and personalized macro-F1 (a records run's second metric) on its own
    held-out rows; what was released."""
    pers = run.personalization
    f1_name = metric_names(run.dataset.format if run.dataset else None).f1
    if pers is None:
        return (
            "None: every client used the global adapter (personalization.mode = none).\n"
            if run.settings["personalization.mode"] == "none"
            else "Not measured: the run ended before its personalization stage.\n"
        )
    how = _PERSONAL_TEXT[pers.mode].format(
        e=pers.epochs, keep=_KEEP_TEXT.get(pers.keep_local or "", ""), lam=pers.ditto_lambda
    )
    out = [f"Mode **{pers.mode}**: {how}. Released: {pers.released}."]
    if pers.mode == "fedrep":
        out.append(
            "The adapter in this repository is the federated part; its head is the seed's initial head (no head was "
            "federated), so the central evaluation above measures an untrained head: fit a head on your own data."
        )
    else:
        out.append("The adapter in this repository is the global one; no personal adapter is in it.")
    if pers.local_only:
        out.append(
            "Local-only: each client also trained an adapter on its own rows alone, from the seed's initial adapter, "
            "for as many epochs as it trained in the federation's rounds."
        )
    if run.privacy is not None and run.privacy.clients:
        out.append(
            "Under sample-level DP every personal step (the per-round personal epochs of fedrep and Ditto, the "
            "fine-tuning and the local-only training after the last round) was DP-SGD from the client's own "
            "accountant: all are in ε above, and the stage after the last round is the ledger's 'pers' column."
        )
    rows = [r for r in pers.clients if r["status"] == "personalized"]
    if not rows:
        out.append(
            "No client reported held-out metrics (a node shares them only when its owner's policy shares "
            "'local-eval'; under DP none does by default)."
        )
        return "\n\n".join(out) + "\n"
    stages = [
        (k, name)
        for k, name in (("local_only", "local-only"), ("federated", "federated"), ("personalized", "personalized"))
        if f"{k}_f1" in rows[0]
    ]
    table = [
        "| client | held-out rows | " + " | ".join(f"{name} {f1_name}" for _, name in stages) + " |",
        "|---|---|" + "---|" * len(stages),
    ]
    natural = {p.partition_id: p.natural_id for p in run.partitions if p.natural_id is not None}
    for r in rows:
        pid = r["partition_id"]
        table.append(
            f"| {pid}{f' ({natural[pid]})' if pid in natural else ''} | {r['num_examples']} | "
            + " | ".join(f"{r[f'{k}_f1']:.3f}" for k, _ in stages)
            + " |"
        )
    sm = pers.summary
    table.append(
        "| mean | | "
        + " | ".join(f"{sm[f'{k}_f1_mean']:.3f}" if f"{k}_f1_mean" in sm else "" for k, _ in stages)
        + " |"
    )
    out.append("\n".join(table))
    wins = [
        f"the {s} adapter beats local-only training on {sm[f'{s}_beats_local_only']} of {sm['clients']} clients"
        for s in ("personalized", "federated")
        if f"{s}_beats_local_only" in sm
    ]
    if wins:
        sizes = [r["num_examples"] for r in rows]
        out.append(
            f"In {f1_name}, " + "; ".join(wins) + f" (held-out rows per client: {_span(sizes)}; small "
            "samples, wide error bars)."
        )
    return "\n\n".join(out) + "\n"


def _span(values: list[int]) -> str:
    return f"{min(values)}" if min(values) == max(values) else f"{min(values)} to {max(values)}"


def _evaluated_rounds(run: RunRecord) -> str:
    """After which rounds the server evaluated, read from the rounds themselves: "after every round", or the
    rounds by number (strategy.central-eval-every, and a run that stopped early is evaluated where it stopped)."""
    trained = [r for r in run.rounds if r.round > 0]
    done = [r.round for r in trained if r.eval_loss is not None]
    if len(done) == len(trained):
        return "after every round"
    named = [str(n) for n in done] if len(done) <= 8 else [*map(str, done[:3]), "…", *map(str, done[-2:])]
    listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    every = run.settings["strategy.central-eval-every"]
    return f"after round{'s' * (len(done) > 1)} {listed} (strategy.central-eval-every = {every})"


def _rounds_table(run: RunRecord, fmt: str = "labels") -> str:
    """Per round: losses (a causal LM's with the perplexity, exp of its loss per token) and the central metrics,
    named for the run's data format (fedhf.data.records.METRICS)."""
    names = metric_names(fmt)
    metrics = f"eval {names.accuracy} | eval {names.f1}"
    lm = run.settings.get("model.task") == "causal-lm"
    rows = [
        f"| round | train loss | eval loss | {'eval perplexity | ' * lm}{metrics} | clients trained |",
        "|---|---|---|---|---|---|" + "---|" * lm,
    ]
    for r in run.rounds:
        tl = "-" if r.train_loss is None else f"{r.train_loss:.4f}"
        trained = "-" if r.round == 0 else str(len(r.trained))
        if r.eval_loss is None:  # a round strategy.central-eval-every skipped
            central = "- | " + "- | " * lm + "- | -"
        else:
            ppl = f"{math.exp(min(r.eval_loss, 700.0)):.2f} | " if lm else ""
            central = f"{r.eval_loss:.4f} | {ppl}{r.eval_accuracy:.4f} | {r.eval_f1:.4f}"
        rows.append(f"| {r.round} | {tl} | {central} | {trained} |")
    return "\n".join(rows) + "\n"


def model_card(run: RunRecord, model_license: str, plots: list[str] | tuple[str, ...] = ()) -> ModelCard:
    """The card of a finished run; ``plots``: the names of the PNGs in the Hub folder's plots/ to show."""
    cfg = run.settings
    ds = run.dataset
    fmt = ds.format or "labels"  # labels, or instruction, chat or plain-text records (data.format)
    task = get_task(cfg["model.task"], None, fmt)
    names = metric_names(fmt)
    data_license = _data_license(run)
    license_id, license_note = combined_license(model_license, data_license)
    src = ds.source
    hub_id = src.get("hub_id")
    languages = ["en"]
    if ds.preset == "afrisenti":
        languages = [AFRISENTI_ISO[lang] for lang in src.get("languages", [])]
    elif not ds.preset:
        languages = None
    tags = ["federated-learning", "flower", "lora", "peft", task.pipeline_tag]
    if run.dp:
        tags.append("differential-privacy")
    if run.privacy is not None and run.privacy.clients:
        tags.append("opacus")
    final = run.final
    eval_name = display_name(run)
    records = fmt != "labels"
    results = [
        EvalResult(
            task_type=task.pipeline_tag,
            dataset_type=hub_id or eval_name,
            dataset_name=eval_name,
            dataset_split=src.get("eval_split") or "test",
            dataset_revision=src.get("revision"),
            metric_type=metric,
            metric_name=name,
            metric_value=float(value),
        )
        for metric, name, value in (
            (names.accuracy_id, names.accuracy[:1].upper() + names.accuracy[1:], final.eval_accuracy),
            (names.f1_id, names.f1[:1].upper() + names.f1[1:], final.eval_f1),
        )
    ]
    data = ModelCardData(
        base_model=published_base_model(run),
        library_name="peft",
        pipeline_tag=task.pipeline_tag,
        datasets=[hub_id] if hub_id else None,
        language=languages,
        license=license_id,
        license_name="research-and-non-commercial-only" if license_id == "other" else None,
        tags=tags,
        metrics=[names.accuracy_id, names.f1_id],
        model_name=f"fedhf-{run.run_id}",
        eval_results=results,
    )
    n_clients = len(client_ids(run))
    base_model = published_base_model(run)
    part = cfg["data.partitioner"]
    natural_column = src.get("partition_column") or cfg["data.partition-column"] or "language"
    part_params = {
        "dirichlet": f"α = {cfg['data.dirichlet-alpha']}, minimum partition size {cfg['data.min-partition-size']}",
        "inner-dirichlet": (
            f"equal-size clients, each client's label mix drawn from Dir(α = {cfg['data.dirichlet-alpha']})"
        ),
        "pathological": f"{cfg['data.classes-per-client']} classes per client",
        "natural": f"one client per value of '{natural_column}'",
        "iid": "equal random shares",
    }[part]
    label_names = ds.label_names
    stopped = run.stopped_early
    pooling = cfg["model.pooling"]
    base_text = (
        f"[`{base_model}`](https://huggingface.co/{base_model})"
        if base_model
        else "a base model loaded from a local folder (its Hub id was not given: set model.hub-id when training, "
        "or name it in adapter_config.json's base_model_name_or_path)"
    )
    stopped_text = f" (stopped early: {stopped.reason})" if stopped else ""
    local_training = (
        f"{cfg['train.local-epochs']} epoch(s) per round, batch {cfg['train.batch-size']}, {_optimizer_text(cfg)}"
    )
    lora_text = (
        f"r {cfg['model.lora.r']}, alpha {cfg['model.lora.alpha']}, dropout {cfg['model.lora.dropout']}, "
        f"modules {','.join(run.model.lora_target_modules or []) or cfg['model.lora.target-modules']}; "
        f"{_adapter_text(cfg)}"
    )
    privacy_note = (
        "The adapter was trained without differential privacy and may reveal training examples."
        if not run.dp
        else "Privacy guarantees hold only as stated above."
    )
    hub_link = f" ([{hub_id}](https://huggingface.co/datasets/{hub_id}))" if hub_id else ""
    ranks = _ranks_text(run)
    ranks_row = f"| client LoRA ranks | {ranks} |\n" if ranks else ""
    adapter_license = license_id if license_id != "other" else "research and non-commercial use only"
    body = f"""
# {data.model_name}

A LoRA adapter for {base_text} fine-tuned for
{task.describe(label_names)} by **federated learning** with
fedhf {__version__} on [Flower](https://flower.ai): {n_clients} clients trained
on their own data, which never left them; only adapter updates ({run.model.adapter_bytes:,} bytes each) were
exchanged.

## Federation

| | |
|---|---|
| clients | {n_clients} |
| rounds | {len(run.trained_rounds)} of {cfg["num-server-rounds"]}{stopped_text} |
| strategy | {cfg["strategy.name"]} |
| fraction of clients per round | {cfg["strategy.fraction-train"]} |
| partitioner | {part} ({part_params}) |
| local training | {local_training} |
| LoRA | {lora_text} |
{ranks_row}| training defaults | {_dp_defaults_text(cfg)} |
| head reads | {_head_text(cfg, pooling, fmt)} |
| updates on the wire | {_TRANSPORT_TEXT[cfg["transport.dtype"]]} |
| failures | {_reliability_text(run)} |
| training rows per client | {_rows_text(run)} |
| seed | {cfg["seed"]} |

## Privacy

{_privacy_section(run)}
## Privacy audit

{_audit_section(run)}
## Secure aggregation

{_secure_aggregation_section(run)}
## Personalization

{_personalization_section(run)}
## Results

Central evaluation of the global adapter by the server on {ds.central_eval_rows} rows of the evaluation split,
before training (round 0) and {_evaluated_rounds(run)}:

{_rounds_table(run, fmt)}
{"".join(f"![{p}](plots/{p})" + chr(10) for p in plots)}{_generations_section(run)}
## How to use

```python
{task.usage_code(base_model, pooling, records=True) if records else task.usage_code(base_model, pooling)}
```

Or `fedhf predict --model REPO_ID --text "an example sentence"`.

## Intended use and limitations

Research on federated and private fine-tuning; {
        {
            "labels": f"{len(label_names)}-class classification of text like the training data",
            "text": "continuing text like the training data",
        }.get(fmt, "answering instructions like the training data")
    } ({
        eval_name
    }). Not evaluated for any other domain or language, for fairness across groups, or for deployment decisions.
{privacy_note}
{f"{names.accuracy[:1].upper() + names.accuracy[1:]} and {names.f1} are" if records else "Accuracy is"} measured on {
        ds.central_eval_rows
    } rows and carries sampling error.

## Data, licences and citations

- Data: {eval_name}{hub_link}, licence: {data_license}.
- Base model licence: {model_license}. This adapter: **{adapter_license}**.
{f"- {license_note}" if license_note else ""}
{f"- Cite the data: {ds.citation}" if ds.citation else ""}
- Provenance (data fingerprints, partition statistics, seeds, config hash, versions): `provenance.json`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


HUB_NAMES = frozenset(ADAPTER_FILES) | {"README.md", "provenance.json", "metrics.csv", "plots"}


def build_hub_folder(run_dir: str | Path, run: RunRecord, model_license: str) -> Path:
    """Write run_dir/hub/ (adapter, tokenizer, README.md card, provenance.json): built aside, then swapped in.

    Only a folder fedhf created as a run folder is written to, and the old hub/ is removed only when it
    holds nothing but what fedhf puts there (a file someone added stops the rebuild, named).
    """
    from fedhf.errors import FedHFRunError
    from fedhf.run.record import check_run_folder

    run_dir = Path(run_dir)
    check_run_folder(run_dir, "building the Hub folder")
    hub = run_dir / "hub"
    if hub.exists():
        foreign = sorted(p.name for p in hub.iterdir() if p.name not in HUB_NAMES) + sorted(
            f"plots/{p.name}" for p in (hub / "plots").glob("*") if p.suffix != ".png"
        )
        if foreign:
            raise FedHFRunError(
                f"'{hub}' holds '{foreign[0]}', which fedhf did not write; move it out of the run folder "
                "before fedhf rebuilds hub/."
            )
    tmp = run_dir / f".hub.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    adapter = run_dir / "adapter"
    for name in ADAPTER_FILES:
        if (adapter / name).is_file():
            shutil.copy2(adapter / name, tmp / name)
    _publishable_base(tmp, published_base_model(run))
    plots = run_dir / "plots"
    pngs = sorted(plots.glob("*.png")) if plots.is_dir() else []
    if plots.is_dir():
        (tmp / "plots").mkdir()
        for png in pngs:
            shutil.copy2(png, tmp / "plots" / png.name)
    card = model_card(run, model_license, [png.name for png in pngs])
    card.save(tmp / "README.md")
    (tmp / "provenance.json").write_text(json.dumps(provenance(run), indent=2) + "\n")
    if (run_dir / "metrics.csv").is_file():
        shutil.copy2(run_dir / "metrics.csv", tmp / "metrics.csv")
    if hub.exists():
        old = run_dir / f".hub.old-{os.getpid()}"
        hub.rename(old)
        tmp.rename(hub)
        shutil.rmtree(old)
    else:
        tmp.rename(hub)
    return hub


def _publishable_base(folder: Path, base: str | None) -> None:
    """The published adapter names the base by its Hub id, never by a local path (None: not named)."""
    for name, key in (("adapter_config.json", "base_model_name_or_path"), ("fedhf.json", "base_model")):
        f = folder / name
        if f.is_file():
            data = json.loads(f.read_text())
            if data.get(key) != base:
                data[key] = base
                f.write_text(json.dumps(data, indent=2) + "\n")
