"""Flower ClientApp: records in, a round of local work (``fedhf.client``), records out.

The run config comes from the server inside each message (the server parsed it once
from its run_config); the node config says which data this node holds: either its own
silo (``data-path=<file or folder on this machine>``) or one partition of a shared
dataset (``partition-id``/``num-partitions``, for simulations and demos), plus the data
owner's privacy budget (``max-epsilon``). This node's DP accountant history is kept on its
disk (``fedhf.node_state``: node config ``state-dir``), written before each reply leaves, so a
restarted SuperNode or server never resets its epsilon; ``context.state`` holds a copy.
With ``strategy.secure-aggregation`` the train messages arrive through Flower's SecAgg+ mod in the legacy FitIns/FitRes format.

In a deployment every message starts a fresh process that imports this module, the
SecAgg+ key-exchange messages included: so torch & co. are imported (via ``fedhf.client``)
only inside the handlers that train or evaluate.
"""

from __future__ import annotations

import json

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedhf.config import LABEL_NAMES_KEY, SPEC_BY_KEY, FedHFConfig, parse_config
from fedhf.errors import FedHFConfigError
from fedhf.secagg import fitins_arrays, fitres_content, is_secure_round, secure_aggregation_mod

app = ClientApp(mods=[secure_aggregation_mod])

PRIVACY_STATE = "fedhf.privacy"  # this node's accountant history, kept in context.state across rounds


def _config(config: ConfigRecord) -> FedHFConfig:
    return parse_config({k: v for k, v in config.items() if k in SPEC_BY_KEY})


def _label_names(config: ConfigRecord) -> list[str] | None:
    raw = config.get(LABEL_NAMES_KEY)
    return json.loads(str(raw)) if raw else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    if is_secure_round(msg):  # SecAgg+: legacy FitIns in, FitRes out (secaggplus_mod masks it)
        arrays, config = fitins_arrays(msg)
        return Message(fitres_content(_train(arrays, config, context), arrays, _config(config)), reply_to=msg)
    if _config(msg.content["config"]).strategy.secure_aggregation:
        raise FedHFConfigError("the run asks for secure aggregation (strategy.secure-aggregation=true) but this train "
                               "message is not part of the SecAgg+ protocol; refusing to send the adapter in the clear.")
    return Message(_train(msg.content["arrays"], msg.content["config"], context), reply_to=msg)


def _train(arrays: ArrayRecord, config: ConfigRecord, context: Context) -> RecordDict:
    from fedhf import client
    from fedhf.node_state import RUN_UID_KEY, NodeStore, arrays_digest, node_key, state_dir

    cfg = _config(config)
    node = client.node_of(context.node_config, context.node_id)
    server_round = int(config["server-round"])
    store = None
    if cfg.privacy.sample_level and config.get(RUN_UID_KEY):
        # The accountant history lives on this machine's disk (it must outlive this process, the
        # SuperNode and the server); context.state keeps a copy for the run's lifetime.
        store = NodeStore(state_dir(context.node_config, config), str(config[RUN_UID_KEY]),
                          node_key(node.pid, node.data_path))
    digest = arrays_digest({k: a.data for k, a in arrays.items()})
    if store is not None and not cfg.strategy.secure_aggregation:
        cached = store.replay(server_round, digest)
        if cached is not None:  # this round was cut off at the server: resend the reply already released
            payload, meta = cached
            info = {**meta["info"], "replayed": True}
            return RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
                               "metrics": MetricRecord(meta["metrics"]), "client-info": ConfigRecord(info)})
    saved = _most_spent(store.privacy_state() if store else None,
                        dict(context.state[PRIVACY_STATE]) if PRIVACY_STATE in context.state else None)
    outcome = client.train_round(
        cfg, node, arrays.to_torch_state_dict(), server_round,
        label_names=_label_names(config), node_config=context.node_config, privacy_state=saved,
        proximal_mu=float(config.get("proximal-mu", 0.0)) if cfg.strategy.name == "fedprox" else 0.0,
    )
    if store is not None:  # before the reply leaves: a spend is never lost
        reply = {"round": server_round, "global_digest": digest, "metrics": outcome.metrics, "info": outcome.info}
        store.save(outcome.privacy_state, reply if outcome.state is not None else None, outcome.state)
    if outcome.privacy_state is not None:
        context.state[PRIVACY_STATE] = ConfigRecord(outcome.privacy_state)
    content = RecordDict({"metrics": MetricRecord(outcome.metrics), "client-info": ConfigRecord(outcome.info)})
    if outcome.state is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in outcome.state.items()})
    return content


def _most_spent(*states: dict | None) -> dict | None:
    """Of the saved accountant histories, the one with the most steps (never under-report)."""
    known = [s for s in states if s]
    return max(known, key=lambda s: sum(int(n) for n in s["history-steps"])) if known else None


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    from fedhf import client

    config = msg.content["config"]
    cfg = _config(config)
    node = client.node_of(context.node_config, context.node_id)
    metrics, info = client.evaluate_round(cfg, node, msg.content["arrays"].to_torch_state_dict(), _label_names(config))
    return Message(RecordDict({"metrics": MetricRecord(metrics), "client-info": ConfigRecord(info)}), reply_to=msg)
