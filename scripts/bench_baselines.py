#!/usr/bin/env python
"""The baselines of benchmark figure [6]: fedhf's default job written the plain way, twice.

``flower``: a minimal Flower + transformers app in the style of Flower's quickstart-huggingface example,
on Flower's current Message API: a ClientApp that, per message, loads the model, tokenizes its partition
(``datasets.map``, ``DataCollatorWithPadding``, shuffled batches), trains with AdamW and replies with the
LoRA + head weights; a ServerApp running Flower's FedAvg with local evaluation on every client and a
central evaluation each round (round 0 included), in Flower's Simulation Engine with the same client
resources as ``fedhf run`` (1 CPU per client, 1 torch thread).

``central``: one centralized PEFT training loop over the union of the clients' training rows, for
rounds x local epochs epochs, with the central evaluation after every ``local epochs`` (as each round).

Same rows (fedhf's own partitions and central rows, read through fedhf's data code only), model,
LoRA (r 8, alpha 16, dropout 0.1 on query,value, head trained), optimizer (AdamW, lr 1e-3), batch size,
max length, rounds and epochs as ``fedhf run --num-clients 3`` with the default config. Prints one JSON
line: the final central accuracy and the seconds inside the process (the caller times the process).

Usage: python scripts/bench_baselines.py flower|central
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

T0 = time.perf_counter()

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from fedhf.config.schema import parse_config  # noqa: E402  (the job's settings and rows: fedhf's own)
from fedhf.data.load import load_data  # noqa: E402
from fedhf.data.partitions import central_eval_set, load_partition  # noqa: E402
from fedhf.tasks.model import resolve_model  # noqa: E402

CFG = parse_config({})
NUM_CLIENTS = 3
MODEL = resolve_model(CFG.model.name)


def get_model(seed: int = CFG.seed) -> Any:
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(MODEL, num_labels=2)
    lora = LoraConfig(
        task_type="SEQ_CLS",
        r=CFG.model.lora.r,
        lora_alpha=CFG.model.lora.alpha,
        lora_dropout=CFG.model.lora.dropout,
        target_modules=CFG.target_modules,
    )
    return get_peft_model(base, lora)


def loader(ds: Any, shuffle: bool) -> DataLoader:
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=CFG.data.max_length), batched=True)
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("input_ids", "attention_mask", "label")])
    ds = ds.rename_column("label", "labels")
    return DataLoader(
        ds, shuffle=shuffle, batch_size=CFG.train.batch_size, collate_fn=DataCollatorWithPadding(tokenizer)
    )


def train(net: Any, trainloader: DataLoader, epochs: int) -> float:
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=CFG.train.lr)
    net.train()
    total, n = 0.0, 0
    for _ in range(epochs):
        for batch in trainloader:
            loss = net(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total, n = total + loss.item(), n + 1
    return total / max(n, 1)


@torch.no_grad()
def test(net: Any, testloader: DataLoader) -> tuple[float, float]:
    net.eval()
    loss, correct, n = 0.0, 0, 0
    for batch in testloader:
        out = net(**batch)
        loss += out.loss.item() * len(batch["labels"])
        correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
        n += len(batch["labels"])
    return loss / n, correct / n


def central_rows() -> Any:
    return central_eval_set(load_data(CFG.data), CFG.data, CFG.seed)


def run_flower() -> float:
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    client = ClientApp()

    @client.train()
    def train_fn(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        net = get_model()
        set_peft_model_state_dict(net, msg.content["arrays"].to_torch_state_dict())
        pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        train_ds, _, _ = load_partition(CFG.data, CFG.seed, pid, n)
        loss = train(net, loader(train_ds, shuffle=True), CFG.train.local_epochs)
        arrays = ArrayRecord(get_peft_model_state_dict(net))
        metrics = MetricRecord({"train_loss": loss, "num-examples": len(train_ds)})
        return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    @client.evaluate()
    def evaluate_fn(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        net = get_model()
        set_peft_model_state_dict(net, msg.content["arrays"].to_torch_state_dict())
        pid, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        _, eval_ds, _ = load_partition(CFG.data, CFG.seed, pid, n)
        loss, acc = test(net, loader(eval_ds, shuffle=False))
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(eval_ds)})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    server = ServerApp()
    final: dict[str, float] = {}

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        net = get_model()
        testloader = loader(central_rows(), shuffle=False)

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            set_peft_model_state_dict(net, arrays.to_torch_state_dict())
            loss, acc = test(net, testloader)
            final["accuracy"] = acc
            return MetricRecord({"accuracy": acc, "loss": loss})

        FedAvg(min_available_nodes=NUM_CLIENTS).start(
            grid=grid,
            initial_arrays=ArrayRecord(get_peft_model_state_dict(net)),
            num_rounds=CFG.num_server_rounds,
            evaluate_fn=central,
        )

    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=NUM_CLIENTS,
        backend_name="ray",
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    return final["accuracy"]


def run_central() -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    import datasets

    rows = datasets.concatenate_datasets(
        [load_partition(CFG.data, CFG.seed, pid, NUM_CLIENTS)[0] for pid in range(NUM_CLIENTS)]
    )
    net = get_model()
    trainloader, testloader = loader(rows, shuffle=True), loader(central_rows(), shuffle=False)
    test(net, testloader)  # round 0, as fedhf's
    acc = 0.0
    for _ in range(CFG.num_server_rounds):
        train(net, trainloader, CFG.train.local_epochs)
        _, acc = test(net, testloader)
    return acc


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ""
    if which not in ("flower", "central"):
        sys.exit("usage: python scripts/bench_baselines.py flower|central")
    accuracy = run_flower() if which == "flower" else run_central()
    print(json.dumps({"baseline": which, "final_accuracy": accuracy, "seconds": time.perf_counter() - T0}))
