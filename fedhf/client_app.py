"""Flower ClientApp: records in, a round of local work (``fedhf.client``), records out.

The run config comes from the server inside each message (the server parsed it once
from its run_config); the node config says which data this node holds: either its own
silo (``data-path=<file or folder on this machine>``) or one partition of a shared
dataset (``partition-id``/``num-partitions``, for simulations and demos), plus the data
owner's privacy budget (``max-epsilon``). This node's DP accountant history lives in
``context.state`` for the whole run. With ``strategy.secure-aggregation`` the train
messages arrive through Flower's SecAgg+ mod in the legacy FitIns/FitRes format.

In a deployment every message starts a fresh process that imports this module, the
SecAgg+ key-exchange messages included: so torch & co. are imported (via ``fedhf.client``)
only inside the handlers that train or evaluate.
"""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
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

    cfg = _config(config)
    node = client.node_of(context.node_config, context.node_id)
    saved = dict(context.state[PRIVACY_STATE]) if PRIVACY_STATE in context.state else None
    outcome = client.train_round(
        cfg, node, arrays.to_torch_state_dict(), int(config["server-round"]),
        label_names=_label_names(config), node_config=context.node_config, privacy_state=saved,
        proximal_mu=float(config.get("proximal-mu", 0.0)) if cfg.strategy.name == "fedprox" else 0.0,
    )
    if outcome.privacy_state is not None:
        context.state[PRIVACY_STATE] = ConfigRecord(outcome.privacy_state)
    content = RecordDict({"metrics": MetricRecord(outcome.metrics), "client-info": ConfigRecord(outcome.info)})
    if outcome.state is not None:
        content["arrays"] = ArrayRecord(outcome.state)
    return content


@app.evaluate()
def evaluate_local(msg: Message, context: Context) -> Message:
    from fedhf import client

    config = msg.content["config"]
    cfg = _config(config)
    node = client.node_of(context.node_config, context.node_id)
    metrics, info = client.evaluate_round(cfg, node, msg.content["arrays"].to_torch_state_dict(), _label_names(config))
    return Message(RecordDict({"metrics": MetricRecord(metrics), "client-info": ConfigRecord(info)}), reply_to=msg)
