"""Flower ClientApp: records in, a round of local work (``fedhf.federation.client``), records out.

The run config comes from the server inside each message (the server parsed it once from its
run_config). The node config is the data owner's word: which data this node holds (its own silo,
``data-path``, or one partition of a shared dataset, ``partition-id``/``num-partitions``) and its
policy (``fedhf.privacy.policy``: minimum privacy, budget, delta ceiling, secure aggregation, what may be
shared). Under ``fedhf run`` each simulated node's policy comes from the ``--node-config`` file
(:func:`make_client_app`), never from the run config.

Nothing leaves the node that its policy does not allow: a request that breaks the policy gets a
refusal naming the rule; an error reaches the server only as :func:`fedhf.errors.text_leaving_node`
(no row values, no local paths; the full error goes to this node's log). The node's sample-level
spend lives on its disk, per dataset (``fedhf.federation.node_state``).

In a deployment every message starts a fresh process that imports this module, the SecAgg+
key-exchange messages included: so torch & co. are imported (via ``fedhf.federation.client``) only inside
the handlers that train or evaluate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.app.message_type import MessageType
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from fedhf.config.schema import LABEL_NAMES_KEY, SPEC_BY_KEY, FedHFConfig, parse_config
from fedhf.errors import FedHFError, text_leaving_node
from fedhf.flower.secagg import (
    REFUSED_PREFIX,
    RUN_CONFIG_KEY,
    fitins_arrays,
    fitres_content,
    is_secure_round,
    secure_aggregation_mod,
)

log = logging.getLogger("fedhf")

ERROR_CODE = 1  # Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
PERSONALIZE_ACTION = "personalize"  # message type evaluate.personalize: fedhf.federation.personal


class PolicyRefusal(FedHFError):
    """A train request inside SecAgg+ that this node's policy refuses (the protocol needs a FitRes or an error)."""

    def __init__(self, pid: int, rule: str, reason: str) -> None:
        text = REFUSED_PREFIX + json.dumps({"partition-id": pid, "rule": rule, "reason": reason})
        super().__init__(text, public=text)


def guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Outermost: no exception text leaves the node as Flower would send it (str(exception), which can quote rows)."""
    try:
        return call_next(msg, context)
    except Exception as exc:  # every error, reported in the words the node may use
        if isinstance(exc, PolicyRefusal):  # not a failure: the node said no (logged where it decided)
            return Message(Error(code=ERROR_CODE, reason=text_leaving_node(exc)), reply_to=msg)
        log.error("this node's ClientApp failed (%s message)", msg.metadata.message_type, exc_info=exc)
        return Message(Error(code=ERROR_CODE, reason=text_leaving_node(exc)), reply_to=msg)


def _config(config: ConfigRecord) -> FedHFConfig:
    return parse_config({k: v for k, v in config.items() if k in SPEC_BY_KEY})


def _label_names(config: ConfigRecord) -> list[str] | None:
    raw = config.get(LABEL_NAMES_KEY)
    return json.loads(str(raw)) if raw else None


def setup_check_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """At the first SecAgg+ stage, refuse a run this node will not train for, before sending any key."""
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    configs = (
        msg.content.config_records.get(RECORD_KEY_CONFIGS) if msg.metadata.message_type == MessageType.TRAIN else None
    )
    if configs is not None and configs.get(Key.STAGE) == Stage.SETUP and RUN_CONFIG_KEY in msg.content.config_records:
        from fedhf.federation import client

        config = msg.content.config_records[RUN_CONFIG_KEY]
        node = client.node_of(context.node_config, context.node_id)
        req = _request(config, digest="", secure=True)
        refusal = client.preflight(req, node, node_config=context.node_config, state_root=_state_root(context, config))
        if refusal is not None:
            log.warning("SecAgg+ set-up refused: %s", refusal.text())
            raise PolicyRefusal(node.pid, refusal.rule, refusal.reason)
    return call_next(msg, context)


def _request(config: ConfigRecord, *, digest: str, secure: bool) -> Any:
    from fedhf.federation import client
    from fedhf.federation.node_state import RUN_UID_KEY

    cfg = _config(config)
    req = client.RoundRequest(
        cfg=cfg,
        server_round=int(config.get("server-round", 0)),
        run_uid=str(config.get(RUN_UID_KEY, "") or ""),
        global_digest=digest,
        secure=secure,
        label_names=_label_names(config),
        proximal_mu=float(config.get("proximal-mu", 0.0)) if cfg.strategy.name == "fedprox" else 0.0,
    )
    if cfg.privacy.sample_level and not req.run_uid:
        raise FedHFError(
            "the server sent no run uid with a DP train request; run the same fedhf version on server and nodes.",
            public="the server sent no run uid with a DP train request.",
        )
    return req


def _state_root(context: Context, config: ConfigRecord) -> Any:
    from fedhf.federation.node_state import state_dir

    return state_dir(context.node_config, config)


def make_client_app(node_configs: Mapping[int, Mapping[str, Any]] | None = None) -> ClientApp:
    """The ClientApp; ``node_configs`` (simulation): each partition's node-config entries, from the owner's file."""
    mods = [guard_mod]
    if node_configs:
        overlays = {int(k): dict(v) for k, v in node_configs.items()}

        def node_config_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
            pid = int(context.node_config.get("partition-id", -1))
            context.node_config.update(overlays.get(pid, {}))
            return call_next(msg, context)

        mods.append(node_config_mod)
    mods += [setup_check_mod, secure_aggregation_mod]
    client_app = ClientApp(mods=mods)

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        if is_secure_round(msg):  # SecAgg+: legacy FitIns in, FitRes out (secaggplus_mod masks it)
            arrays, config = fitins_arrays(msg)
            content = _train(arrays, config, context, secure=True)
            info = content["client-info"]
            if info.get("status") == "refused":  # the protocol takes a FitRes or an error: drop out, with the rule
                raise PolicyRefusal(int(info["partition-id"]), str(info["rule"]), str(info["reason"]))
            return Message(fitres_content(content, arrays, _config(config)), reply_to=msg)
        return Message(_train(msg.content["arrays"], msg.content["config"], context, secure=False), reply_to=msg)

    @client_app.evaluate()
    def evaluate_local(msg: Message, context: Context) -> Message:
        from fedhf.federation import client

        config = msg.content["config"]
        node = client.node_of(context.node_config, context.node_id)
        from fedhf.federation.node_state import RUN_UID_KEY

        metrics, info = client.evaluate_round(
            _config(config),
            node,
            msg.content["arrays"].to_torch_state_dict(),
            _label_names(config),
            context.node_config,
            state_root=_state_root(context, config),
            run_uid=str(config.get(RUN_UID_KEY, "") or ""),
        )
        return Message(RecordDict({"metrics": MetricRecord(metrics), "client-info": ConfigRecord(info)}), reply_to=msg)

    @client_app.evaluate(PERSONALIZE_ACTION)
    def personalize(msg: Message, context: Context) -> Message:
        from fedhf.federation import client, personal

        config = msg.content["config"]
        node = client.node_of(context.node_config, context.node_id)
        metrics, info = personal.final_round(
            _request(config, digest="", secure=False),
            node,
            msg.content["arrays"].to_torch_state_dict(),
            node_config=context.node_config,
            state_root=_state_root(context, config),
        )
        return Message(RecordDict({"metrics": MetricRecord(metrics), "client-info": ConfigRecord(info)}), reply_to=msg)

    return client_app


def _train(arrays: ArrayRecord, config: ConfigRecord, context: Context, *, secure: bool) -> RecordDict:
    from fedhf.federation import client
    from fedhf.federation.node_state import arrays_digest

    node = client.node_of(context.node_config, context.node_id)
    req = _request(config, digest=arrays_digest({k: a.data for k, a in arrays.items()}), secure=secure)
    outcome = client.train_round(
        req,
        node,
        arrays.to_torch_state_dict(),
        node_config=context.node_config,
        state_root=_state_root(context, config),
    )
    content = RecordDict({"metrics": MetricRecord(outcome.metrics), "client-info": ConfigRecord(outcome.info)})
    if outcome.state is not None:
        content["arrays"] = ArrayRecord({k: Array(v) for k, v in outcome.state.items()})
    return content


app = make_client_app()
