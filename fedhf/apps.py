"""The composition root: fedhf's ServerApp and simulation, wired from every stage.

The story of a run:
1. Parse the run config once (``FedHFConfig``) and open the run folder (``run.json``: running).
2. Load the dataset: its label names, the central eval split, and (when the server can
   see the training rows, as in simulation) the per-client partition statistics.
3. Build the base model + LoRA from the seed; its adapter is the initial global state.
4. Build the strategy from the config; it sends the adapter and the resolved config to the
   sampled clients, aggregates their adapters, and after every round the server evaluates
   the global adapter on the central eval set and records the round.
5. Save the final adapter (PEFT format) with the tokenizer, write the Hub-ready folder
   (model card, provenance), mark the run complete, and push it when hub.push is set.
A privacy budget running out for too many clients ends the run early, cleanly, at step 5.

This module imports every stage (run record, release, analysis) and hands Flower plain callables;
``fedhf.flower`` holds every ``flwr`` import. ``server_app`` is the app ``flwr run`` loads
(pyproject ``[tool.flwr.app.components]``); ``simulate`` is what ``fedhf run`` calls.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedhf.config.schema import LABEL_NAMES_KEY, FedHFConfig, parse_config
from fedhf.data.canaries import canary_format, canary_info
from fedhf.data.load import load_data
from fedhf.data.partitions import central_eval_set, format_stats, make_partitions
from fedhf.data.records import metric_names
from fedhf.errors import FedHFConfigError, FedHFError, FedHFHubError
from fedhf.federation.node_state import RUN_UID_KEY, STATE_DIR_KEY, stores_in
from fedhf.flower.client_app import make_client_app
from fedhf.flower.secagg import SecAggSettings, SecureAggregationGrid
from fedhf.flower.server_app import latest_adapter, personalize, server_app_for, start
from fedhf.flower.simulation import simulate as simulate_apps
from fedhf.flower.strategy import (
    RunStopped,
    build_strategy,
    restore_strategy_state,
    strategy_state,
)
from fedhf.privacy.dp import run_privacy_info
from fedhf.privacy.ledger import ledger_table
from fedhf.release.card import base_model_license, build_hub_folder, published_view
from fedhf.release.hub import push
from fedhf.run.checkpoint import POINTER, Checkpoint, save_checkpoint
from fedhf.run.console import RunConsole, attach_log_file
from fedhf.run.progress import RoundProgress, round_line
from fedhf.run.record import RunRecorder
from fedhf.run.resume import changed_keys, resume_target
from fedhf.run.store import Dataset, Federation, HubPush, Model, Personalization
from fedhf.tasks.adapters import save_adapter
from fedhf.tasks.base import get_task
from fedhf.tasks.model import (
    adapter_nbytes,
    build_model,
    count_params,
    get_adapter_state,
    is_bundled,
    load_tokenizer,
    lora_modules,
    model_nbytes,
    resolve_model,
    set_adapter_state,
)

log = logging.getLogger("fedhf")


def _main(grid: Any, run_config: Mapping[str, Any]) -> None:
    """Under ``flwr run``: the config is the app's run_config (pyproject defaults + overrides).

    ``--run-config "resume='RUN_DIR'"`` continues that run from its last checkpoint, with its own config.
    """
    cfg = parse_config(run_config)
    if not cfg.resume:
        run(grid, cfg)
        return
    target = resume_target(Path(cfg.resume), "config key 'resume'")
    if target.engine == "simulation":
        raise FedHFConfigError(
            f"config key 'resume': the run in '{target.run_dir}' was started with fedhf run, whose simulated clients "
            "keep their privacy state in its client-state folder; continue it with "
            f"fedhf run --resume {target.run_dir}."
        )
    changed = changed_keys(run_config, target)
    if changed:
        raise FedHFConfigError(
            f"config key 'resume': the run in '{target.run_dir}' keeps its own configuration, and this request "
            f"changes {', '.join(changed)}; drop those (a changed configuration is a new run)."
        )
    log.info("resuming %s after round %d of %d", target.run_dir, target.checkpoint.round, target.cfg.num_server_rounds)
    run(grid, target.cfg, resume=target.checkpoint, resume_dir=target.run_dir)


server_app = server_app_for(_main)


def simulate(
    cfg: FedHFConfig,
    num_clients: int,
    cpus_per_client: int = 1,
    *,
    gpus_per_client: float = 0.0,
    resume: Checkpoint | None = None,
    resume_dir: Path | None = None,
    node_configs: dict[int, dict[str, Any]] | None = None,
    console: RunConsole | None = None,
) -> Path:
    """Simulate ``num_clients`` SuperNodes (one partition each), run the federation, return the run folder.

    ``resume``: continue the run in ``resume_dir`` from this checkpoint. ``node_configs``: each simulated
    node's owner policy and state dir (``fedhf run --node-config FILE``). The clients keep their DP
    accountant state under RUN_DIR/client-state (and each node's own state dir, when it names one).
    ``console``: where the run's lines go (``fedhf run`` captures everything else into RUN_DIR/log.txt).
    ``gpus_per_client``: the GPU share Ray reserves for each client (``fedhf.tasks.device.gpu_share``).
    """
    state_roots = tuple(
        sorted(
            {
                Path(str(nc["state-dir"])).expanduser()
                for nc in (node_configs or {}).values()
                if str(nc.get("state-dir", "")).strip()
            }
        )
    )
    result: dict[str, Any] = {}

    def main(grid: Any, _run_config: Mapping[str, Any]) -> None:
        run(
            grid,
            cfg,
            num_clients,
            result,
            resume=resume,
            resume_dir=resume_dir,
            client_state_in_run_dir=True,
            state_roots=state_roots,
            console=console,
        )

    simulate_apps(main, make_client_app(node_configs), num_clients, cpus_per_client, gpus_per_client)
    return Path(result["run_dir"])


def run(
    grid: Any,
    cfg: FedHFConfig,
    num_partitions: int | None = None,
    result: dict[str, Any] | None = None,
    *,
    resume: Checkpoint | None = None,
    resume_dir: Path | None = None,
    client_state_in_run_dir: bool = False,
    state_roots: tuple[Path, ...] = (),
    console: RunConsole | None = None,
) -> Path:
    """Run the federation; ``num_partitions`` (when known) lets the server log partition statistics at start.

    ``resume``: the checkpoint of ``resume_dir`` to continue from (``fedhf run --resume``). ``console``: the
    terminal of ``fedhf run``; without one (``flwr run``) fedhf's log lines also go to RUN_DIR/log.txt.
    """
    if resume is not None:
        recorder = RunRecorder(cfg, resume_dir, resume_from=resume.run)
        log.info("fedhf run %s resumed after round %d -> %s", recorder.run_id, resume.round, recorder.dir)
    else:
        recorder = RunRecorder(cfg)
        log.info("fedhf run %s -> %s", recorder.run_id, recorder.dir)
    if num_partitions:
        recorder.set_federation(
            Federation(engine="simulation" if client_state_in_run_dir else "flower", num_clients=num_partitions)
        )
    if result is not None:
        result["run_dir"] = recorder.dir
    done = resume.round if resume is not None else 0
    if console is not None:
        log_path = console.adopt(recorder.dir)
        console.line(f"run folder: {recorder.dir}  (full log: {log_path})")
        progress = console.progress(cfg.num_server_rounds, done)
        detach = None
    else:
        progress = RoundProgress(cfg.num_server_rounds, done)
        detach = attach_log_file(recorder.dir)
    try:
        try:
            _run(grid, cfg, recorder, progress, num_partitions, resume, client_state_in_run_dir, state_roots)
        except BaseException as exc:
            if isinstance(exc, (SystemExit, KeyboardInterrupt)):  # `flwr stop`, SIGTERM or Ctrl-C
                recorder.fail(f"stopped before completion ({type(exc).__name__}: `flwr stop`, a signal or Ctrl-C)")
            else:
                recorder.fail(f"{type(exc).__name__}: {exc}")
            if (recorder.dir / POINTER).is_file():
                log.error(
                    "The run stopped; its last checkpoint is kept: continue it with fedhf run --resume %s", recorder.dir
                )
            raise
        finally:
            progress.close()
        if cfg.hub.push and recorder.record.status == "complete":
            _push(cfg, recorder)
    finally:
        if detach is not None:
            detach()
    return recorder.dir


def _push(cfg: FedHFConfig, recorder: RunRecorder) -> None:
    """Upload the finished run's hub/ folder; the run stays complete if the push fails (push again later)."""
    try:
        result = push(recorder.dir, cfg.hub.repo_id, private=cfg.hub.private)
    except FedHFHubError as exc:  # recorded, not raised: the run itself is complete
        recorder.pushed(HubPush(repo_id=cfg.hub.repo_id, ok=False, error=str(exc)))
        log.error(
            "The run is complete but the push failed: %s (retry: fedhf push %s --repo-id %s)",
            exc,
            recorder.dir,
            cfg.hub.repo_id,
        )
        return
    recorder.pushed(HubPush(repo_id=cfg.hub.repo_id, ok=True, commit_url=result.commit_url))
    log.info("Pushed %d files to %s", len(result.files), cfg.hub.repo_id)


def _run(
    grid: Any,
    cfg: FedHFConfig,
    recorder: RunRecorder,
    progress: RoundProgress,
    num_partitions: int | None,
    resume: Checkpoint | None,
    client_state_in_run_dir: bool,
    state_roots: tuple[Path, ...] = (),
) -> None:
    # 2. data
    data, eval_ds = _record_data(cfg, recorder, num_partitions, resume)
    progress.metrics = metric_names(data.format)
    progress.perplexity = cfg.model.task == "causal-lm"
    # 3. model and initial adapter
    tokenizer = load_tokenizer(cfg.model.name)
    model = build_model(cfg, data.label_names)
    resolved = _record_model(cfg, recorder, model)
    initial = get_adapter_state(model)
    _check_rank(cfg, initial)
    # 4. federated rounds
    info = run_privacy_info(cfg.privacy)
    if info is not None:
        recorder.set_privacy(info)
    if cfg.audit.canaries:
        a = cfg.audit
        fmt = canary_format(data.format)
        recorder.set_canaries(canary_info(a.canaries, a.canary_repeats, a.canary_client, cfg.seed, fmt))
    strategy = build_strategy(cfg, recorder, num_partitions, num_labels=len(data.label_names))
    if resume is not None:
        restore_strategy_state(strategy, resume.strategy_arrays, resume.strategy)
        set_adapter_state(model, {k: torch.from_numpy(v) for k, v in resume.arrays.items()})  # checks names, shapes
        initial = get_adapter_state(model)
    if cfg.strategy.secure_aggregation:
        settings = SecAggSettings.from_config(cfg)
        recorder.set_secure_aggregation(settings.describe())
        grid = SecureAggregationGrid(grid, settings, recorder.secure_aggregation_round)
    done_before = resume.round if resume is not None else 0
    evaluate = CentralEvaluation(
        cfg, recorder, progress, strategy, model, tokenizer, eval_ds, data.label_names, done_before, resume is not None
    )
    # The clients get the parsed config, the federation's label names (a silo maps its labels onto them)
    # and the run's uid (they keep their DP accountant state under it, across restarts).
    client_config = {
        **cfg.to_flat(),
        LABEL_NAMES_KEY: json.dumps(data.label_names),
        RUN_UID_KEY: recorder.record.run_uid,
    }
    if client_state_in_run_dir:
        client_config[STATE_DIR_KEY] = str((recorder.dir / "client-state").resolve())
        state_roots = (recorder.dir / "client-state", *state_roots)
    stopped = None
    remaining = cfg.num_server_rounds - done_before
    try:
        final_arrays = initial  # when the interruption came after the last round's checkpoint
        if remaining > 0:
            released = start(
                strategy,
                grid,
                initial,
                num_rounds=remaining,
                timeout=cfg.strategy.round_timeout,
                client_config=client_config,
                evaluate=evaluate,
                offset=done_before,
            )
            final_arrays = released if released is not None else initial  # None: no round released an aggregate
        done = [r.round for r in recorder.record.rounds]
        if done[-1:] != [cfg.num_server_rounds]:
            raise RuntimeError(f"the strategy ended after rounds {done}, not {cfg.num_server_rounds}")
    except RunStopped as exc:
        stopped = str(exc)
        log.warning("Ending the run early: %s. The last global adapter is kept.", stopped)
        recorder.abandon_round()
        final_arrays = latest_adapter(strategy, initial)
        evaluate.evaluate_last(final_arrays)
    if cfg.personalization.on and stopped is None:
        _personalize(grid, cfg, recorder, progress, final_arrays, client_config)
    elif cfg.personalization.on:
        log.warning("No personalization: the run ended early (%s)", stopped)
    if cfg.privacy.sample_level:
        for root in state_roots:
            _count_saved_spend(recorder, root)
    if stopped and recorder.record.rounds[-1].round == 0:
        # Nothing was trained (every node refused, or none could train): no adapter to release.
        recorder.stop(stopped)
        log.warning("Run stopped before any round was trained: %s", stopped)
        return
    # 5. artifacts
    set_adapter_state(model, final_arrays)
    _release(cfg, recorder, model, tokenizer, data.label_names, resolved, stopped, state_roots)


def _personalize(
    grid: Any,
    cfg: FedHFConfig,
    recorder: RunRecorder,
    progress: RoundProgress,
    final_arrays: dict[str, torch.Tensor],
    client_config: dict[str, Any],
) -> None:
    """After the last round: every node measures the global adapter, its personalized one and (personalization.
    local-only) one trained on its rows alone, on its held-out rows; the personal adapters stay on the nodes."""
    from fedhf.errors import Malformed
    from fedhf.federation.replies import screen_personalize
    from fedhf.run.store import snake_keys

    pers = cfg.personalization
    config = {**client_config, "server-round": cfg.num_server_rounds + 1}
    replies = personalize(grid, final_arrays, config, timeout=cfg.strategy.round_timeout)
    rows, privacy = [], {}
    for node, metrics, info, error in replies:
        if error is not None:
            rows.append({"node_id": node, "status": "failed", "reason": error.strip().splitlines()[-1][:300]})
            continue
        try:
            screened = screen_personalize(metrics, info, node_id=node, sample_level=cfg.privacy.sample_level)
        except Malformed as exc:
            rows.append({"node_id": node, "status": "failed", "reason": f"malformed reply: {exc}"})
            continue
        rows.append(snake_keys([screened.record])[0])
        if screened.privacy is not None:
            privacy[str(screened.record["partition-id"])] = snake_keys([screened.privacy])[0]
    rows.sort(key=lambda r: (r.get("partition_id", -1), r["node_id"]))
    summary = personalization_summary(rows)
    record = Personalization(
        mode=pers.mode,
        epochs=pers.epochs,
        keep_local=pers.keep_local if pers.mode == "fedrep" else None,
        ditto_lambda=pers.ditto_lambda if pers.mode == "ditto" else None,
        local_only=pers.local_only,
        released="metrics only: each node's personal adapter "
        + ("and local-only adapter " if pers.local_only else "")
        + "stays on the node (its state folder); the server received the held-out metrics of the nodes whose "
        "owners share 'local-eval'",
        clients=rows,
        summary=summary,
    )
    recorder.personalized(record, privacy, after=cfg.num_server_rounds)
    statuses: dict[str, int] = {}
    for r in rows:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    names = metric_names(recorder.record.dataset.format if recorder.record.dataset else None)
    progress.write(personalization_line(pers.mode, summary, statuses, names.f1))


def personalization_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of the run's two metrics (``f1``: macro-F1 or a records run's second metric; ``accuracy``) per stage
    over the clients that reported every stage the run measured, and on how
    many of them the personalized (and the federated) adapter beats local-only training."""
    done = [r for r in rows if r["status"] == "personalized"]
    stages = [s for s in ("federated", "personalized", "local_only") if done and all(f"{s}_f1" in r for r in done)]
    out: dict[str, Any] = {"clients": len(done)}
    for s in stages:
        out[f"{s}_f1_mean"] = sum(r[f"{s}_f1"] for r in done) / len(done)
        out[f"{s}_accuracy_mean"] = sum(r[f"{s}_accuracy"] for r in done) / len(done)
    if "local_only" in stages:
        for s in ("personalized", "federated"):
            if s in stages:
                out[f"{s}_beats_local_only"] = sum(r[f"{s}_f1"] > r["local_only_f1"] for r in done)
    return out


STATUS_TEXT = {
    "not-shared": "do not share local-eval",
    "refused": "refused",
    "failed": "failed",
    "no-personal-state": "never trained",
}


def personalization_line(
    mode: str, summary: dict[str, Any], statuses: dict[str, int], f1_name: str = "macro-F1"
) -> str:
    """The console's line for the personalization stage; ``f1_name`` names the run's second metric (macro-F1, token
    F1 or top-5 next-token accuracy: fedhf.data.records.METRICS)."""
    n, asked = summary["clients"], sum(statuses.values())
    parts = [
        f"{name} {summary[key]:.3f}"
        for name, key in (
            ("local-only", "local_only_f1_mean"),
            ("federated", "federated_f1_mean"),
            ("personalized", "personalized_f1_mean"),
        )
        if key in summary
    ]
    text = f"[fedhf] personalization ({mode}): {n}/{asked} clients reported their held-out metrics"
    others = {k: v for k, v in statuses.items() if k != "personalized"}
    if others:
        text += " (" + ", ".join(f"{v} {STATUS_TEXT.get(k, k)}" for k, v in sorted(others.items())) + ")"
    if parts:
        text += f"; mean {f1_name} " + ", ".join(parts)
    if "personalized_beats_local_only" in summary:
        text += f"; personalized beats local-only on {summary['personalized_beats_local_only']}/{n}"
    return text


def _check_rank(cfg: FedHFConfig, initial: dict[str, torch.Tensor]) -> None:
    """Under svd aggregation the global rank must fit every LoRA layer's product (a matrix of out x in)."""
    from fedhf.federation.lora_ranks import lora_pairs, max_rank

    if cfg.strategy.lora_aggregation != "svd":
        return
    arrays = {k: v.numpy() for k, v in initial.items()}
    if not lora_pairs(arrays):
        return
    most = max_rank(arrays)
    if cfg.model.lora.r > most:
        raise FedHFConfigError(
            f"config key 'model.lora.r': got {cfg.model.lora.r}, above {most}, the largest rank a product B·A of "
            f"this model's LoRA layers can have (min of their output and input sizes); strategy.lora-aggregation="
            f"svd keeps the SVD truncation of that product: set model.lora.r to at most {most}."
        )


def _record_data(
    cfg: FedHFConfig, recorder: RunRecorder, num_partitions: int | None, resume: Checkpoint | None
) -> tuple[Any, Any]:
    """The dataset and the central eval rows, recorded (and the partitions, when this server can see them)."""
    data = load_data(cfg.data)
    eval_ds = central_eval_set(data, cfg.data, cfg.seed)
    preset = data.preset
    recorder.set_dataset(
        Dataset(
            name=cfg.data.dataset,
            source=data.source,
            label_names=data.label_names,
            train_rows=len(data.train),
            central_eval_rows=len(eval_ds),
            preset=preset.name if preset else None,
            license=preset.license if preset else None,
            citation=preset.citation if preset else None,
            format=data.format,
        )
    )
    if num_partitions and resume is None:
        stats = make_partitions(data, cfg.data, cfg.seed, num_partitions).stats()
        recorder.set_partitions(stats)
        log.info(
            "Per-client data (%s, %d clients):\n%s",
            cfg.data.partitioner,
            num_partitions,
            format_stats(stats, data.label_names),
        )
    return data, eval_ds


def _record_model(cfg: FedHFConfig, recorder: RunRecorder, model: Any) -> str:
    """The model's facts, recorded; where it was loaded from."""
    initial = get_adapter_state(model)
    trainable, total = count_params(model)
    resolved = resolve_model(cfg.model.name)
    recorder.set_model(
        Model(
            name=cfg.model.name,
            task=cfg.model.task,
            resolved_from="bundled" if is_bundled(resolved) else "local" if Path(resolved).is_dir() else "hub",
            base_is_local_folder=Path(cfg.model.name).expanduser().is_dir(),
            trainable_params=trainable,
            total_params=total,
            adapter_bytes=adapter_nbytes(initial),
            model_bytes=model_nbytes(model),
            adapter_tensors=len(initial),
            lora_target_modules=lora_modules(model),
        )
    )
    return resolved


class CentralEvaluation:
    """Flower's evaluate_fn: after a round, evaluate the global adapter on the central rows (before the first round,
    every strategy.central-eval-every rounds and after the last), record the round and checkpoint it."""

    def __init__(
        self,
        cfg: FedHFConfig,
        recorder: RunRecorder,
        progress: RoundProgress,
        strategy: Any,
        model: Any,
        tokenizer: Any,
        eval_ds: Any,
        label_names: list[str],
        done_before: int,
        resumed: bool,
    ) -> None:
        self.cfg, self.recorder, self.progress, self.strategy = cfg, recorder, progress, strategy
        self.model, self.tokenizer, self.done_before, self.resumed = model, tokenizer, done_before, resumed
        self.num_labels = len(label_names)
        self.task = get_task(cfg.model.task, label_names)
        self.loader = self.task.make_loader(
            eval_ds, tokenizer, cfg.data.max_length, 64, shuffle=False, sort_by_length=True
        )
        self.samples = None  # the fixed central rows each round answers (a generative task, model.sample-prompts)
        if cfg.model.task == "causal-lm" and cfg.model.sample_prompts and len(eval_ds):
            self.samples = eval_ds.select(range(min(cfg.model.sample_prompts, len(eval_ds))))
            if not resumed:
                recorder.set_sample_prompts(self.task.sample_prompts(self.samples, len(self.samples)))

    def due(self, server_round: int) -> bool:
        """Whether the central evaluation runs after ``server_round`` (the run's own round number)."""
        every, last = self.cfg.strategy.central_eval_every, self.cfg.num_server_rounds
        return server_round == 0 or server_round == last or server_round % every == 0

    def _evaluate(self, arrays: dict[str, torch.Tensor]) -> tuple[dict[str, float], float, list[str] | None]:
        t0 = time.perf_counter()
        set_adapter_state(self.model, arrays)
        res = self.task.evaluate(self.model, self.loader, self.num_labels)
        generations = (
            self.task.generations(self.model, self.tokenizer, self.samples, self.cfg.data.max_length)
            if self.samples is not None
            else None
        )
        central = {"loss": res.loss, "accuracy": res.accuracy, "f1": res.macro_f1}
        return central, time.perf_counter() - t0, generations

    def __call__(self, server_round: int, arrays: dict[str, torch.Tensor]) -> dict[str, float] | None:
        server_round += self.done_before
        if self.resumed and server_round == self.done_before:
            return None  # evaluated (and checkpointed) before the interruption
        central, seconds, generations = self._evaluate(arrays) if self.due(server_round) else (None, None, None)
        row = self.recorder.end_round(server_round, central, seconds, generations)
        # The round is complete: checkpoint it (global adapter, strategy state, the record so far).
        strategy_arrays, strategy_scalars = strategy_state(self.strategy)
        save_checkpoint(
            self.recorder.dir,
            server_round,
            run_uid=self.recorder.record.run_uid,
            config_sha256=self.recorder.record.config_sha256,
            arrays={k: a.numpy() for k, a in arrays.items()},
            strategy_arrays=strategy_arrays,
            strategy_state=strategy_scalars,
            run_record=self.recorder.record.to_dict(),
        )
        self.progress.round_done(row)
        if central is None:
            return None
        return {"eval-loss": central["loss"], "eval-accuracy": central["accuracy"], "eval-f1": central["f1"]}

    def evaluate_last(self, arrays: dict[str, torch.Tensor]) -> None:
        """A run that ended early keeps ``arrays``, the adapter of its last recorded round: evaluate that round
        now when strategy.central-eval-every skipped it (the run's results are its last round's)."""
        rounds = self.recorder.record.rounds
        if rounds and rounds[-1].eval_accuracy is None:
            central, seconds, generations = self._evaluate(arrays)
            row = self.recorder.evaluate_last(central, seconds, generations)
            p = self.progress
            p.write(round_line(row, p.total, p.metrics, p.perplexity) + "  (evaluated where the run stopped)")


def _release(
    cfg: FedHFConfig,
    recorder: RunRecorder,
    model: Any,
    tokenizer: Any,
    label_names: list[str],
    resolved: str,
    stopped: str | None,
    state_roots: tuple[Path, ...],
) -> None:
    """The run's folder, complete: the adapter, plots, the Hub-ready folder; then the run is marked complete."""
    data_format = recorder.record.dataset.format if recorder.record.dataset else None
    save_adapter(model, tokenizer, cfg, label_names, recorder.dir / "adapter", data_format or "labels")
    recorder.set_final(stopped)
    _plots(recorder)
    hub = build_hub_folder(recorder.dir, recorder.record, base_model_license(cfg.model.name, resolved))
    recorder.finish(hub_folder=hub.name)
    # The simulated clients' cached replies (their individual updates, kept for a resume) are not needed any
    # more; their spend stays, next to the ledger.
    for root in state_roots:
        for store in stores_in(root):
            store.drop_replies(recorder.record.run_uid)
    if cfg.privacy.mode != "none":
        log.info("\n%s", ledger_table(recorder.record.privacy))
    names = metric_names(recorder.record.dataset.format if recorder.record.dataset else None)
    log.info(
        "Run complete: %s (central %s %.4f, %s %.4f)",
        recorder.dir,
        names.accuracy,
        recorder.record.final.eval_accuracy,
        names.f1,
        recorder.record.final.eval_f1,
    )


def _count_saved_spend(recorder: RunRecorder, state_root: Path) -> None:
    """In simulation the clients' saved spend is on this machine: the ledger must not report less than any of them
    holds (a client that trained in a round cut off by a restart, or replied too late, and was not asked again)."""
    from fedhf.privacy.dp import epsilon_of

    ledger = recorder.record.privacy.clients if recorder.record.privacy else {}
    uid = recorder.record.run_uid
    for store in stores_in(state_root):
        try:
            with store.transaction() as spend:
                mine = [e for e in spend.entries if e["run_uid"] == uid and e.get("partition_id") is not None]
        except FedHFError as exc:
            log.error("cannot read the saved spend under %s: %s", store.dir, exc)
            continue
        for pid in sorted({int(e["partition_id"]) for e in mine}):
            entries = [e for e in mine if int(e["partition_id"]) == pid]
            steps = sum(int(e["steps"]) for e in entries)
            reported = ledger.get(str(pid), {}).get("reported_steps", 0)
            if steps > reported:
                first = entries[0]
                history = [(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"])) for e in entries]
                log.warning(
                    "client %s: its saved spend holds %d steps, the ledger %d (a round the server did not use); "
                    "the ledger counts them",
                    pid,
                    steps,
                    reported,
                )
                recorder.saved_spend(
                    str(pid),
                    {
                        "epsilon": epsilon_of(first["accountant"], history, float(first["delta"])),
                        "steps": steps,
                        "delta": float(first["delta"]),
                        "noise_multiplier": float(first["noise_multiplier"]),
                        "max_grad_norm": float(first["max_grad_norm"]),
                        "sample_rate": float(entries[-1]["sample_rate"]),
                        "accountant": first["accountant"],
                    },
                )


def _plots(recorder: RunRecorder) -> None:
    """The run's plots into run_dir/plots (the hub folder and the card include them).

    The run's results are already saved; a plot that cannot be drawn is logged and recorded,
    and `fedhf report RUN_DIR` can draw it again.
    """
    from fedhf.analysis.plots import run_plots

    try:
        run_plots(published_view(recorder.record), recorder.dir / "plots")  # per-client figures only where shared
    except (OSError, ValueError, KeyError, TypeError) as exc:
        recorder.record.plots_error = f"{type(exc).__name__}: {exc}"
        log.error("Could not draw the run's plots (%s); run `fedhf report %s` to retry.", exc, recorder.dir)
