"""The ``fedhf`` command.

Every user error (config, data, model) is printed as one line, ``error: ...``, with
exit code 2; a run that fails after starting exits 1 and its run.json says ``failed``.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedhf.config.schema import (
    AUTO,
    FedHFConfig,
    describe,
    dp_defaults_in_force,
    load_config_file,
    parse_config,
    parse_set_args,
)
from fedhf.errors import FedHFConfigError, FedHFError

app = typer.Typer(
    help="fedhf: federated LoRA fine-tuning of Hugging Face models with Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML file of run-config keys (e.g. experiments/<name>.toml).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override one key: --set KEY=VALUE (repeatable). 'fedhf config' lists the keys."),
]
ClientsOpt = Annotated[
    int, typer.Option("--num-clients", "-n", help="Simulated clients (SuperNodes), one partition each.")
]


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _setup_logging() -> None:
    logger = logging.getLogger("fedhf")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s fedhf: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _quiet_libraries() -> None:
    """Post-run commands print their own results: no progress bars or load reports from datasets/transformers."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def resolve_cli_config(config_file: Path | None, sets: list[str] | None) -> FedHFConfig:
    flat: dict[str, Any] = {}
    if config_file is not None:
        flat.update(load_config_file(config_file))
    flat.update(parse_set_args(sets or []))
    return parse_config(flat)


def _check_new_run_folder(cfg: FedHFConfig) -> None:
    """A named run goes into a folder fedhf creates: an existing one is never adopted (the ServerApp checks again)."""
    if not cfg.run_name:
        return
    target = Path(cfg.output_dir).expanduser() / cfg.run_name
    if (target / "run.json").exists():
        raise FedHFConfigError(
            f"config key 'run-name': '{target}' already holds a run; choose another run-name or "
            "output-dir (or continue it with fedhf run --resume)."
        )
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FedHFConfigError(
            f"config key 'run-name': '{target}' already exists and is not empty; fedhf creates its "
            "own run folders and will not adopt another one. Choose another run-name or output-dir."
        )


def _check_clients(cfg: FedHFConfig, num_clients: int) -> None:
    if num_clients < 1:
        raise FedHFConfigError(f"--num-clients: got {num_clients}; num-partitions must be >= 1.")
    s = cfg.strategy
    for key, value in (
        ("strategy.min-available-nodes", s.min_available_nodes),
        ("strategy.min-train-nodes", s.min_train_nodes),
        ("strategy.min-evaluate-nodes", s.min_evaluate_nodes if s.fraction_evaluate > 0 else 0),
    ):
        if value > num_clients:
            raise FedHFConfigError(
                f"config key '{key}': got {value}, more than --num-clients {num_clients}; the run would wait forever. "
                f"Lower it (--set {key}={num_clients}) or add clients."
            )


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    num_clients: Annotated[
        int | None,
        typer.Option("--num-clients", "-n", help="Simulated clients (SuperNodes), one partition each (default 3)."),
    ] = None,
    cpus_per_client: Annotated[
        int, typer.Option(help="CPU cores Ray reserves per simulated client (whole number).")
    ] = 1,
    gpus_per_client: Annotated[
        float | None,
        typer.Option(
            help="GPU share Ray reserves per simulated client, from 0 to 1 (0.25: four clients per GPU at once). "
            "Unset: none on a machine without a GPU or with train.device cpu; else an equal share for every client.",
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an interrupted run from its last checkpoint (RUN_DIR): same config, clients and run folder.",
        ),
    ] = None,
    node_config: Annotated[
        Path | None,
        typer.Option(
            "--node-config",
            help="TOML file of the simulated nodes' own configs (their owners' policy): a [default] table and "
            "[nodes.N] tables, e.g. min-privacy, max-epsilon, share, state-dir. Never taken from the run config.",
        ),
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="Show everything Flower, Ray and the libraries print, live (it always goes to RUN_DIR/log.txt).",
        ),
    ] = False,
) -> None:
    """Run a federated LoRA fine-tune in Flower's simulation engine and write outputs/<run-id>/.

    The console shows the plan, a progress bar, one line per round and a summary; everything else goes to
    RUN_DIR/log.txt.
    """
    from fedhf.run.console import RunConsole

    checkpoint = None
    node_configs = None
    try:
        asked = parse_set_args(set_ or [])
        if resume is None and "resume" in asked:  # --set resume=RUN_DIR is --resume RUN_DIR (empty: a new run)
            set_ = [s for s in set_ or [] if not s.strip().startswith("resume=")]
            if str(asked["resume"]).strip():
                resume = Path(str(asked["resume"])).expanduser()
        if resume is not None:
            cfg, num_clients, checkpoint = _resume_target(resume, config, set_, num_clients)
        else:
            cfg = resolve_cli_config(config, set_)
            if cfg.resume:
                raise FedHFConfigError(
                    f"config key 'resume': '{cfg.resume}' continues an earlier run with that run's own config; give "
                    "it alone, as fedhf run --resume RUN_DIR (without --config or other --set keys)."
                )
            num_clients = 3 if num_clients is None else num_clients
            _check_new_run_folder(cfg)
        _check_clients(cfg, num_clients)
        if cpus_per_client < 1:
            raise FedHFConfigError(f"--cpus-per-client: got {cpus_per_client}; it must be a whole number >= 1.")
        from fedhf.tasks.device import check_precision, gpu_share, resolve_device

        resolve_device(cfg.train.device)  # the simulated clients and the server run on this machine
        gpus = gpu_share(gpus_per_client, cfg.train.device, num_clients)
        # a simulated client without a GPU share sees none (Ray hides them): it trains on the CPU
        check_precision(cfg.train.precision, resolve_device("cpu" if gpus == 0 else cfg.train.device))
        if node_config is not None:
            from fedhf.federation.node import load_node_config_file

            node_configs = load_node_config_file(node_config, num_clients)
        node_configs = _canary_consent(cfg, num_clients, node_configs)
    except FedHFError as exc:
        _fail(str(exc))
    console = RunConsole(verbose)
    log_path = (
        resume / "log.txt"
        if resume is not None
        else Path(cfg.output_dir).expanduser() / f"fedhf-{os.getpid()}-{secrets.token_hex(3)}.log"
    )
    error: tuple[str, int] | None = None
    with console.capture(log_path):
        try:
            _preflight(cfg, num_clients, node_configs, console, resumed=checkpoint is not None)
        except FedHFError as exc:  # bad input found before the run starts: exit 2
            error = (str(exc), 2)
        if error is None:
            try:
                run_dir = _simulate(
                    cfg, num_clients, (cpus_per_client, gpus), checkpoint, resume, node_configs, console
                )
            except Exception as exc:  # the server's exception, re-raised by the simulation runtime: exit 1
                cause = exc.__cause__ or exc
                error = (f"run failed: {type(cause).__name__}: {cause} (full log: {console.log_path})", 1)
    if error is not None:
        if error[1] == 2 and resume is None:  # nothing ran: the temporary log holds only what loading the data said
            log_path.unlink(missing_ok=True)
        _fail(*error)
    from fedhf.run.store import load_run

    summary = load_run(run_dir)
    if summary.status == "stopped":
        why = summary.stopped_early.reason if summary.stopped_early else "no round trained"
        _fail(f"run stopped before any round was trained: {why} ({run_dir})", code=1)
    final = summary.final
    if final is None:
        _fail(f"run failed: {summary.error or summary.status} ({run_dir})", code=1)
    from fedhf.data.records import metric_names

    names = metric_names(summary.dataset.format if summary.dataset else None)
    typer.echo(
        f"run complete: {run_dir}  central {names.accuracy} {final.eval_accuracy:.4f}  {names.f1} {final.eval_f1:.4f}"
    )
    push = summary.hub_push
    if push:
        typer.echo(
            f"pushed to {push.repo_id}: {push.commit_url}"
            if push.ok
            else f"the push to {push.repo_id} failed: {push.error} (retry: fedhf push {run_dir} --repo-id "
            f"{push.repo_id})"
        )
    spent = _largest_epsilon(summary)
    if spent:
        typer.echo(f"privacy: {spent}; the ledger: fedhf privacy ledger {run_dir}")


def _canary_consent(
    cfg: FedHFConfig, num_clients: int, node_configs: dict[int, dict[str, Any]] | None
) -> dict[int, dict[str, Any]] | None:
    """The simulated node configs with ``allow-canaries = true`` on the canary client: in a simulation the one who
    asks for canaries (``audit.canaries``) owns every node. A ``--node-config`` file that says false is refused."""
    a = cfg.audit
    if not a.canaries or not 0 <= a.canary_client < num_clients:
        return node_configs  # no canaries; or a client that does not exist, which the preflight names
    from fedhf.federation.node import node_allows_canaries

    configs = {pid: dict(nc) for pid, nc in (node_configs or {}).items()}
    own = configs.setdefault(a.canary_client, {})
    if "allow-canaries" in own and not node_allows_canaries(own):
        raise FedHFConfigError(
            f"config key 'audit.canaries': client {a.canary_client}'s node config says allow-canaries=false, so it "
            "would refuse the canaries every round; set audit.canaries=0, pick another audit.canary-client, or drop "
            "allow-canaries from that node's table."
        )
    own["allow-canaries"] = True
    return configs


def _simulate(
    cfg: FedHFConfig,
    num_clients: int,
    resources: tuple[int, float],
    checkpoint: Any,
    resume: Path | None,
    node_configs: dict[int, dict[str, Any]] | None,
    console: Any,
) -> Path:
    from fedhf.apps import simulate  # imports Flower's simulation stack

    return simulate(
        cfg,
        num_clients,
        resources[0],
        gpus_per_client=resources[1],
        resume=checkpoint,
        resume_dir=resume,
        node_configs=node_configs,
        console=console,
    )


def _resume_target(
    run_dir: Path, config: Path | None, sets: list[str] | None, num_clients: int | None
) -> tuple[FedHFConfig, int, Any]:
    """The config, client count and checkpoint of an interrupted run (everything comes from RUN_DIR)."""
    from fedhf.run.resume import resume_target

    if config is not None or sets:
        raise FedHFConfigError(
            "--resume takes the run's configuration from RUN_DIR/run.json; drop --config and --set "
            "(a changed configuration is a new run)."
        )
    target = resume_target(run_dir)
    if not target.num_clients:
        raise FedHFConfigError(
            f"--resume '{run_dir}': run.json does not say how many clients the run had; "
            "only runs started with fedhf run can be resumed this way (a run started with flwr run resumes with "
            f"flwr run --run-config \"resume='{run_dir}'\")."
        )
    if num_clients is not None and num_clients != target.num_clients:
        raise FedHFConfigError(
            f"--num-clients: got {num_clients}, but the run in '{run_dir}' has {target.num_clients} clients; "
            "drop --num-clients (a resumed run keeps its clients)."
        )
    typer.echo(f"resuming {run_dir} after round {target.checkpoint.round} of {target.cfg.num_server_rounds}", err=True)
    return target.cfg, target.num_clients, target.checkpoint


def _largest_epsilon(run: Any) -> str | None:  # a fedhf.run.store.RunRecord (imported when needed)
    """The summary's privacy line: the largest per-client sample-level epsilon, the client-level epsilon."""
    if run.privacy is None:
        return None
    parts = []
    eps = [float(c["epsilon"]) for c in run.privacy.clients.values() if c.get("epsilon") is not None]
    if eps:
        parts.append(f"sample-level epsilon at most {max(eps):.3f} per client")
    cl = run.privacy.client_level or {}
    if cl.get("epsilon") is not None:
        parts.append(f"client-level epsilon {float(cl['epsilon']):.3f}")
    return "; ".join(parts) or None


def _adapter_text(cfg: FedHFConfig) -> str:
    """What trains and travels, in the plan's words."""
    targets = cfg.model.lora.target_modules
    lora = f"r={cfg.model.lora.r} on {'the family default' if targets == 'auto' else targets}"
    causal = cfg.model.task == "causal-lm"
    return {
        "lora": f"LoRA {lora}",
        "ffa-lora": f"FFA-LoRA {lora} (A frozen at the seed; B{'' if causal else ' and the head'} train and travel)",
        "head": "the classification head alone (LoRA off)",
    }[cfg.model.adapter]


def _records_text(fmt: str) -> str:
    """What a run's rows are, in the plan's words: instruction records, messages records, or plain text."""
    return "plain text (loss on every token)" if fmt == "text" else f"{fmt} records"


def _check_records(cfg: FedHFConfig, data: Any, parts: Any, tokenizer: Any) -> None:
    """Every client's rows and the central rows tokenize into (prompt, response) with a response to learn, within
    data.max-length: the errors a client would hit in round 1, said before the run (tokenizing is quick)."""
    from fedhf.data.partitions import central_eval_set
    from fedhf.tasks.base import get_task

    task = get_task(cfg.model.task, [])
    for pid, (train, local_eval) in enumerate(parts.parts):
        for what, ds in (("training", train), ("local eval", local_eval)):
            if ds is None or not len(ds):
                continue
            try:
                task.make_loader(ds, tokenizer, cfg.data.max_length, 64, shuffle=False)
            except FedHFError as exc:
                raise type(exc)(f"client {pid}'s {what} rows: {exc}") from None
    try:
        task.make_loader(central_eval_set(data, cfg.data, cfg.seed), tokenizer, cfg.data.max_length, 64, shuffle=False)
    except FedHFError as exc:
        raise type(exc)(f"the central eval rows: {exc}") from None


def _check_canaries(cfg: FedHFConfig, num_clients: int, stats: list[dict[str, Any]], resolved: str) -> dict[int, int]:
    """audit.canaries checked before the run: a client that exists and has the rows, and a tokenizer that writes
    every digit (else each secret is the same unknown token and no exposure can be measured). Returns the canary
    rows each client trains on, {partition id: rows}."""
    a = cfg.audit
    if not a.canaries:
        return {}
    if a.canary_client >= num_clients:
        raise FedHFConfigError(
            f"config key 'audit.canary-client': got {a.canary_client}, but the run has {num_clients} clients "
            f"(partition ids 0..{num_clients - 1}); name one of them."
        )
    rows = next(r["train_examples"] for r in stats if r["partition_id"] == a.canary_client)
    from fedhf.data.canaries import canary_rows, run_canaries
    from fedhf.tasks.model import load_tokenizer

    canary_rows(run_canaries(a.canaries, "instruction", cfg.seed), a.canary_repeats, rows)  # at most `rows` canaries
    tok = load_tokenizer(resolved)
    probe = "0123456789"
    if tok.decode(tok(probe, add_special_tokens=False)["input_ids"]).replace(" ", "") != probe:
        raise FedHFConfigError(
            f"config key 'audit.canaries': the tokenizer of model.name '{cfg.model.name}' does not write the digits "
            f"0-9 back as they were ({probe!r} -> {tok.decode(tok(probe, add_special_tokens=False)['input_ids'])!r}), "
            "so the canaries' secrets cannot be told apart; use a model whose tokenizer has the digits."
        )
    return {a.canary_client: a.canaries * a.canary_repeats}


def _plan_lines(cfg: FedHFConfig, num_clients: int, data: Any, parts: Any, resolved: str) -> list[str]:
    """What the run will do, in a few lines: data, clients, model, privacy, output folder."""
    from fedhf.tasks.model import is_bundled

    s, p, d = cfg.strategy, cfg.privacy, cfg.data
    stats = parts.stats()
    train_rows = sum(r["train_examples"] for r in stats)
    local_eval = sum(r["eval_examples"] for r in stats)
    where = "bundled copy" if is_bundled(resolved) else "local folder" if Path(resolved).is_dir() else "Hub"
    eval_rows = len(data.eval) if data.eval is not None else 0
    if d.max_eval_examples:
        eval_rows = min(eval_rows, d.max_eval_examples)
    if p.mode == "none":
        privacy = "none: the server sees each client's update"
    else:
        bits = []
        if p.sample_level:
            how = (
                f"target epsilon {p.target_epsilon:g}"
                if p.target_epsilon is not None
                else f"sigma {p.noise_multiplier:g}"
            )
            bits.append(f"sample-level DP-SGD ({how}, C {p.max_grad_norm:g}, {p.accountant} accountant)")
        if p.client_level:
            bits.append(f"client-level DP ({p.client_clipping} clipping, sigma {p.client_noise_multiplier:g})")
        privacy = "; ".join(bits)
    if s.secure_aggregation:
        privacy += "; SecAgg+ (the server sees only the sum)"
    return [
        f"fedhf run: {num_clients} simulated clients, {cfg.num_server_rounds} "
        f"round{'s' * (cfg.num_server_rounds != 1)} of {s.name}, "
        f"{cfg.train.local_epochs} local epoch(s) each",
        f"  data     {d.dataset}: {train_rows + local_eval:,} rows over {num_clients} clients ({d.partitioner}; "
        f"{train_rows:,} train, {local_eval:,} local eval), {eval_rows:,} central eval rows; "
        + (f"labels {', '.join(data.label_names)}" if data.format == "labels" else _records_text(data.format)),
        f"  model    {cfg.model.name} ({where}), {_adapter_text(cfg)}{_device_text(cfg)}",
        f"  privacy  {privacy}",
        *_dp_defaults_line(cfg),
        *_personal_line(cfg),
        *_audit_line(cfg),
        f"  output   {Path(cfg.output_dir).expanduser()}/",
    ]


def _device_text(cfg: FedHFConfig) -> str:
    """Where the model runs, when that is not simply the CPU in fp32 (a GPU, MPS, or mixed precision)."""
    from fedhf.tasks.device import resolve_device

    device = resolve_device(cfg.train.device).type
    if device == "cpu" and cfg.train.precision == "fp32":
        return ""
    precision = f", {cfg.train.precision} mixed precision" if cfg.train.precision != "fp32" else ""
    where = "cuda (the server; clients with a GPU share)" if device == "cuda" else device
    return f"; on {where}{precision}"


def _audit_line(cfg: FedHFConfig) -> list[str]:
    a = cfg.audit
    if not a.canaries:
        return []
    return [
        f"  audit    {a.canaries} canary secret(s) x {a.canary_repeats} in client {a.canary_client}'s training rows "
        f"(listed in run.json; `fedhf audit RUN_DIR` measures their exposure)"
    ]


def _personal_line(cfg: FedHFConfig) -> list[str]:
    """With a personalization mode: what each client keeps, and the stage after the last round."""
    pers = cfg.personalization
    if not pers.on:
        return []
    what = {
        "finetune": f"each client fine-tunes the final adapter for {pers.epochs} epoch(s)",
        "fedrep": f"the {pers.keep_local} stays on each client ({pers.epochs} epoch(s) of it per round)",
        "ditto": f"each client keeps a Ditto adapter ({pers.epochs} epoch(s) per round, lambda {pers.ditto_lambda:g})",
    }[pers.mode]
    alone = "; local-only baseline too" if pers.local_only else ""
    dp = "; every personal step is DP-SGD, planned and accounted" if cfg.privacy.sample_level else ""
    return [f"  personal {pers.mode}: {what}{alone}; personal adapters stay on the nodes{dp}"]


def _dp_defaults_line(cfg: FedHFConfig) -> list[str]:
    """Under sample-level DP: which training keys hold fedhf's DP defaults (a key set explicitly wins)."""
    chosen = dp_defaults_in_force(cfg.to_flat())
    if not chosen:
        return []
    return ["  training " + ", ".join(f"{k}={v}" for k, v in chosen.items()) + " (DP defaults; a key you set wins)"]


def _preflight(
    cfg: FedHFConfig,
    num_clients: int,
    node_configs: dict[int, dict[str, Any]] | None = None,
    console: Any = None,
    *,
    resumed: bool = False,
) -> None:
    """Everything that can be checked before Ray starts (data, partitions, model id), and the plan on the console."""
    from fedhf.data.load import load_data
    from fedhf.data.partitions import format_stats, make_partitions

    def say(text: str) -> None:
        if console is not None:
            console.line(text)
        else:
            typer.echo(text, err=True)

    data = load_data(cfg.data)
    parts = make_partitions(data, cfg.data, cfg.seed, num_clients)
    from fedhf.tasks.model import (
        resolve_model,  # torch and transformers: only once the data is known to be good
    )

    resolved = resolve_model(cfg.model.name)
    if cfg.model.task == "causal-lm":  # before the run folder: a model that cannot generate is refused now
        from fedhf.tasks.causal_lm import check_causal_lm, check_lora_targets, fit_texts
        from fedhf.tasks.model import load_tokenizer

        model_config = check_causal_lm(resolved, cfg.model.name)
        if cfg.target_modules != ["auto"]:  # auto: the family's attention projections
            check_lora_targets(model_config, cfg.target_modules)

        tokenizer = load_tokenizer(resolved)
        if data.format == "labels":
            fit_texts(["x"], data.label_names, tokenizer, cfg.data.max_length)  # the template fits
        else:
            _check_records(cfg, data, parts, tokenizer)
    canary_rows = _check_canaries(cfg, num_clients, parts.stats(), resolved)
    if not resumed:
        for line in _plan_lines(cfg, num_clients, data, parts, resolved):
            say(line)
    say(format_stats(parts.stats(), data.label_names))
    if cfg.strategy.secure_aggregation:
        from fedhf.config.schema import check_secagg_weight
        from fedhf.flower.secagg import SecAggSettings
        from fedhf.flower.strategy import min_sampled

        settings = SecAggSettings.from_config(cfg)
        settings.check_round(min(min_sampled(cfg, num_clients), num_clients))
        settings.check_round(num_clients)  # the most clients a round can sample (quantization overflow)
        for row in parts.stats():
            check_secagg_weight(cfg, row["train_examples"])
    p = cfg.privacy
    if p.sample_level and p.target_epsilon is not None:
        # Each client plans its own sigma in round 1; check now that every client can meet the target.
        from fedhf.privacy.dp import plan_for

        for row in parts.stats():
            plan = plan_for(cfg, row["train_examples"] + canary_rows.get(row["partition_id"], 0))
            say(
                f"privacy plan: client {row['partition_id']}: sigma {plan.noise_multiplier:.4f} for target epsilon "
                f"{p.target_epsilon:g} at delta {plan.delta:.3g} (q {plan.sample_rate:.4f}, {plan.total_steps} steps)"
            )
    if node_configs:
        # Each simulated node enforces its owner's policy itself; say now which would refuse this run.
        from fedhf.privacy.policy import check_request, parse_policy

        for pid, nc in sorted(node_configs.items()):
            policy = parse_policy(nc)
            refusal = check_request(
                policy,
                mode=p.mode,
                secure=cfg.strategy.secure_aggregation,
                noise_multiplier=None if p.target_epsilon is not None else p.noise_multiplier,
            )
            say(
                f"node policy: client {pid}: {policy.describe()}"
                + (f"; it will refuse this run: {refusal.reason}" if refusal else "")
            )


@app.command()
def partitions(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    num_clients: ClientsOpt = 3,
) -> None:
    """Print the per-client statistics (size, label histogram) of a config, without training."""
    _setup_logging()
    from fedhf.data.load import load_data
    from fedhf.data.partitions import format_stats, make_partitions

    try:
        cfg = resolve_cli_config(config, set_)
        data = load_data(cfg.data)
        parts = make_partitions(data, cfg.data, cfg.seed, num_clients)
    except FedHFError as exc:
        _fail(str(exc))
    typer.echo(
        f"dataset {cfg.data.dataset}: {len(data.train)} training rows, "
        f"{f'labels {data.label_names}' if data.format == 'labels' else _records_text(data.format)}; "
        f"partitioner {cfg.data.partitioner}, {num_clients} clients, seed {cfg.seed}"
    )
    typer.echo(format_stats(parts.stats(), data.label_names))


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print every run-config key with its value (defaults, then --config and --set applied)."""
    try:
        cfg = resolve_cli_config(config, set_)
    except FedHFError as exc:
        _fail(str(exc))
    flat = cfg.to_flat()
    for key, _default, help_text in describe():
        typer.echo(f"{key} = {flat[key]!r}    # {help_text}")


@app.command("node-check")
def node_check(
    node_config: Annotated[
        str,
        typer.Option(
            "--node-config",
            help="The SuperNode's node config, as given to flower-supernode: 'data-path=\"/data/silo\" max-epsilon=8'.",
        ),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    labels: Annotated[
        str,
        typer.Option(
            "--labels", help="A silo's federation label names, comma-separated (the server sends them in a run)."
        ),
    ] = "",
) -> None:
    """Check a SuperNode's node config on the data owner's machine before it joins: keys, data, budget, state dir."""
    _setup_logging()
    import datasets

    datasets.disable_progress_bars()
    from fedhf.config.schema import split_list
    from fedhf.data.partitions import load_partition
    from fedhf.data.silos import load_silo
    from fedhf.federation import faults
    from fedhf.federation.node import NODE_CONFIG_KEYS, node_allows_canaries, node_of
    from fedhf.federation.node_state import state_dir
    from fedhf.privacy.policy import parse_policy

    try:
        cfg = resolve_cli_config(config, set_)
        nc = _parse_node_config(node_config)
        unknown = sorted(set(nc) - set(NODE_CONFIG_KEYS))
        if unknown:
            raise FedHFConfigError(
                f"node config key '{unknown[0]}' is not one fedhf reads; known keys: {', '.join(NODE_CONFIG_KEYS)}."
            )
        node = node_of(nc, 0)
        if node.data_path is not None:
            names = split_list(labels)
            if len(names) < 2 and not (cfg.model.task == "causal-lm" and not names):  # none: a records silo
                raise FedHFConfigError(
                    "--labels: a silo is checked against the federation's label names; give at "
                    "least two, e.g. --labels negative,positive."
                )
            train, local_eval, names = load_silo(cfg.data, node.data_path, tuple(names), cfg.seed)
        else:
            train, local_eval, names = load_partition(cfg.data, cfg.seed, node.pid, node.num_partitions)
        policy = parse_policy(nc)
        faults.planned(nc, node.pid, 1)
        canaries = node_allows_canaries(nc) and node.data_path is None  # a silo never takes them
        where = state_dir(nc, {})
        try:
            where.mkdir(parents=True, exist_ok=True)
            probe = where / f".fedhf-write-check-{os.getpid()}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise FedHFConfigError(
                f"node config 'state-dir': '{where}' is not writable ({exc.strerror}); this node keeps "
                "its DP accountant history there. Give a writable folder."
            ) from None
        spent = _lifetime_spend(cfg, node, where)
    except FedHFError as exc:
        _fail(str(exc))
    what = f"silo {node.data_path}" if node.data_path else f"partition {node.pid} of {node.num_partitions}"
    typer.echo(
        f"node config ok: {what}: {len(train)} training rows, {0 if local_eval is None else len(local_eval)} "
        f"local eval rows, labels {names}; state dir {where}"
    )
    typer.echo(f"policy: {policy.describe()}")
    if canaries:
        typer.echo("allow-canaries: a run may add the audit's canary records to this node's training rows")
    budget = f" of the budget {policy.max_epsilon:g}" if policy.max_epsilon is not None else " (no budget set)"
    if spent is None:
        typer.echo(f"lifetime privacy spend on this data: none yet{budget}")
    else:
        typer.echo(
            f"lifetime privacy spend on this data: epsilon {spent['epsilon']:.4f}{budget} at delta "
            f"{spent['delta']:.3g} ({spent['accountant']}), {spent['steps']} DP-SGD steps in {spent['runs']} run(s)"
        )


def _lifetime_spend(cfg: FedHFConfig, node: Any, root: Path) -> dict[str, Any] | None:
    """What every run so far spent on this node's data (its spend store under the state dir), or None."""
    from fedhf.federation.client import data_key
    from fedhf.federation.node_state import SpendStore, legacy_key
    from fedhf.privacy.dp import epsilon_of

    store = SpendStore(root, data_key(cfg, node))
    with store.transaction(legacy=legacy_key(node.pid, node.data_path)) as spend:
        if not spend.entries:
            return None
        kind, delta, history = spend.lifetime()
        return {
            "epsilon": epsilon_of(kind, history, delta),
            "delta": delta,
            "accountant": kind,
            "steps": sum(h[2] for h in history),
            "runs": len(spend.runs()),
        }


def _parse_node_config(text: str) -> dict[str, Any]:
    """Flower's node-config syntax (space-separated key=value, TOML values); a bare word is taken as a string,
    as scripts/deploy/start_supernode.sh does."""
    import re
    import tomllib

    pattern = re.compile(r"(\S+?)=(\'[^\']*\'|\"[^\"]*\"|\S+)")  # the pattern of flwr.common.config.parse_config_args
    rest = pattern.sub("", text).strip()
    if rest:
        raise FedHFConfigError(
            f"--node-config: cannot read {rest!r}; write space-separated key=value pairs, e.g. "
            "'partition-id=0 data-path=\"/data/silo\"'."
        )
    out: dict[str, Any] = {}
    for key, value in pattern.findall(text):
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            if value[:1] in "\"'":
                raise FedHFConfigError(
                    f"--node-config: value {value} of '{key}' is not a valid quoted string."
                ) from None
            out[key] = value
    return out


privacy_app = typer.Typer(help="Plan differential privacy and read a run's privacy ledger.", no_args_is_help=True)
app.add_typer(privacy_app, name="privacy")


@privacy_app.command("plan")
def privacy_plan(
    target_epsilon: Annotated[float, typer.Option(help="Target epsilon after the last round.")],
    num_examples: Annotated[int, typer.Option(help="The client's training rows.")],
    rounds: Annotated[
        int, typer.Option(help="Rounds the client trains (num-server-rounds; default: the run's).")
    ] = FedHFConfig().num_server_rounds,
    local_epochs: Annotated[
        int, typer.Option(help="train.local-epochs (default: a sample-level DP run's when the key is unset).")
    ] = AUTO["train.local-epochs"][1],
    batch_size: Annotated[
        int,
        typer.Option(
            help="train.batch-size, the expected Poisson batch (default: a sample-level DP run's, key unset)."
        ),
    ] = AUTO["train.batch-size"][1],
    delta: Annotated[float | None, typer.Option(help="Delta; default 0.1 / num-examples.")] = None,
    accountant: Annotated[str, typer.Option(help="rdp or prv.")] = "rdp",
) -> None:
    """Print the noise multiplier for a target epsilon and the projected epsilon after each round.

    For a run without personalization; a client of a personalized run also plans its personal epochs, and
    `fedhf run` with privacy.target-epsilon prints each client's own plan before it starts.
    """
    from fedhf.privacy.dp import FedHFPrivacyError, epsilon_of, plan_sample_level

    try:
        for name, value in (
            ("--num-examples", num_examples),
            ("--rounds", rounds),
            ("--local-epochs", local_epochs),
            ("--batch-size", batch_size),
        ):
            if value < 1:
                raise FedHFConfigError(f"{name}: got {value}; it must be >= 1.")
        if not target_epsilon > 0:
            raise FedHFConfigError(f"--target-epsilon: got {target_epsilon}; it must be > 0.")
        if delta is not None and not 0 < delta < 1:
            raise FedHFConfigError(f"--delta: got {delta}; it must be in (0, 1).")
        if accountant not in ("rdp", "prv"):
            raise FedHFConfigError(f"--accountant: got {accountant!r}; allowed: rdp, prv.")
        plan = plan_sample_level(
            num_examples,
            batch_size=batch_size,
            local_epochs=local_epochs,
            rounds=rounds,
            accountant=accountant,
            target_epsilon=target_epsilon,
            noise_multiplier=0.0,
            delta=delta,
        )
        d, q, steps, sigma = plan.delta, plan.sample_rate, plan.steps_per_round, plan.noise_multiplier
    except (FedHFError, FedHFPrivacyError) as exc:
        _fail(str(exc))
    typer.echo(
        f"noise multiplier sigma = {sigma:.4f} for target epsilon {target_epsilon:g} at delta {d:.3g} "
        f"({accountant}; sampling rate q = {q:.4f}, {steps} steps per round, {rounds} rounds)"
    )
    typer.echo(f"{'round':>5}  {'steps':>6}  {'epsilon':>8}")
    for r in range(1, rounds + 1):
        typer.echo(f"{r:>5}  {steps * r:>6}  {epsilon_of(accountant, [(sigma, q, steps * r)], d):>8.4f}")


@privacy_app.command("ledger")
def privacy_ledger(run_dir: Annotated[Path, typer.Argument(help="A run folder (outputs/<run-id>).")]) -> None:
    """Print the privacy ledger of a run: each client's epsilon after every round, and why any stopped."""
    from fedhf.privacy.ledger import ledger_table
    from fedhf.run.store import load_run

    try:
        run = load_run(run_dir)
    except FedHFError as exc:
        _fail(str(exc))
    if run.status != "complete":
        typer.echo(f"warning: run status is {run.status!r}, not complete", err=True)
    typer.echo(ledger_table(run.privacy))


@app.command()
def push(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (outputs/<run-id>).")],
    repo_id: Annotated[str, typer.Option("--repo-id", help="Hub repo, namespace/name.")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to (created if absent).")] = None,
    create_pr: Annotated[
        bool, typer.Option("--create-pr", help="Open a pull request instead of committing to the branch.")
    ] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be uploaded; send nothing.")] = False,
    export: Annotated[
        list[str] | None,
        typer.Option("--export", help="Also publish this `fedhf export` format under export/FORMAT/ (repeatable)."),
    ] = None,
) -> None:
    """Upload a finished run's hub/ folder (adapter, model card, provenance) to the Hugging Face Hub.

    The token comes from HF_TOKEN or the huggingface_hub login cache; HF_ENDPOINT selects the Hub.
    """
    from fedhf.release.hub import push as do_push

    try:
        result = do_push(
            run_dir,
            repo_id,
            private=private,
            revision=revision,
            create_pr=create_pr,
            dry_run=dry_run,
            exports=tuple(export or ()),
        )
    except FedHFError as exc:
        _fail(str(exc))
    verb = "would upload" if result.dry_run else "uploaded"
    typer.echo(
        f"{verb} {len(result.files)} files to {result.repo_id}" + (f" (branch {revision})" if revision else "") + ":"
    )
    for name, size in result.files:
        typer.echo(f"  {name}  {size:,} B")
    if result.pr_url:
        typer.echo(f"pull request: {result.pr_url}")
    elif result.commit_url:
        typer.echo(f"commit: {result.commit_url}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (outputs/<run-id>).")],
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help="int8 (PyTorch dynamic int8), onnx (ONNX Runtime, fp32) or onnx-int8 (ONNX Runtime dynamic int8).",
        ),
    ] = "int8",
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for the latency figures (default: torch's, all cores).")
    ] = None,
) -> None:
    """Merge the run's adapter into its base model and export it for CPU inference to RUN_DIR/export/FORMAT/.

    The export is measured against the fp32 merged model on the run's central evaluation rows (accuracy, size,
    latency per example at batch 1 and 32) and gets its own card section (README.md there); `fedhf push --export
    FORMAT` publishes it with the run. Text-classification runs with model.pooling cls.
    """
    _setup_logging()
    _quiet_libraries()
    from fedhf.analysis.export import check_format, export_run

    try:
        check_format(format_)
        if threads is not None and threads < 1:
            raise FedHFConfigError(f"--threads: got {threads}; give a whole number >= 1.")
        folder, f = export_run(run_dir, format_, threads=threads)
    except FedHFError as exc:
        _fail(str(exc))
    typer.echo(f"export {f.format}: {folder}")
    typer.echo(
        f"  size {f.bytes:,} B ({f.bytes / f.fp32_bytes:.1%} of the fp32 merged model's {f.fp32_bytes:,} B); "
        f"accuracy {f.accuracy:.4f} vs fp32 {f.fp32_accuracy:.4f} on {f.rows:,} rows"
    )
    typer.echo(
        f"  latency per example: batch 1 {f.latency_ms_batch1:.2f} ms vs {f.fp32_latency_ms_batch1:.2f} ms "
        f"({f.fp32_latency_ms_batch1 / f.latency_ms_batch1:.2f}x), batch 32 {f.latency_ms_batch32:.2f} ms vs "
        f"{f.fp32_latency_ms_batch32:.2f} ms ({f.fp32_latency_ms_batch32 / f.latency_ms_batch32:.2f}x); "
        f"{f.threads} thread(s)"
    )


@app.command()
def predict(
    model: Annotated[str, typer.Option("--model", help="A run folder, an adapter folder, or a Hub repo id.")],
    text: Annotated[list[str] | None, typer.Option("--text", help="Text to classify (repeatable).")] = None,
    file: Annotated[Path | None, typer.Option("--file", help="A file with one text per line.")] = None,
    base_model: Annotated[
        str | None,
        typer.Option(
            "--base-model",
            help="The base model (Hub id or local folder), when the adapter does not name it or should load "
            "another copy.",
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            help="Generative adapters: tokens to generate at most (default: enough for the longest label name).",
        ),
    ] = None,
    sample: Annotated[
        bool, typer.Option("--sample", help="Generative adapters: sample (with --temperature, --top-p) not greedy.")
    ] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="With --sample: softmax temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option("--top-p", help="With --sample: nucleus sampling mass (0, 1].")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="With --sample: the sampling seed.")] = 0,
) -> None:
    """Load base model + adapter with PEFT and print, for each input, the label (a generative adapter: its answer),
    its probability and the text."""
    _setup_logging()
    _quiet_libraries()
    from fedhf.tasks.adapters import load_adapter_model, resolve_adapter

    try:
        generation = _generation_options(max_new_tokens, sample, temperature, top_p, seed)
        texts = list(text or [])
        if file is not None:
            if not file.is_file():
                raise FedHFConfigError(f"--file '{file}': no such file.")
            texts += [line for line in file.read_text().splitlines() if line.strip()]
        if not texts:
            raise FedHFConfigError("nothing to classify: give --text or --file.")
        folder = resolve_adapter(model)
        adapter = load_adapter_model(folder, base_model)
        if generation is not None and adapter.task.name != "causal-lm":
            raise FedHFConfigError(
                f"--max-new-tokens, --sample, --temperature, --top-p and --seed are for generative adapters; '{model}' "
                f"is a {adapter.task.name} adapter, which prints a label; drop them."
            )
    except FedHFError as exc:
        _fail(str(exc))

    def one_line(text: str) -> str:  # one line per input: newlines and tabs escaped
        return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")

    for t, (label, prob) in zip(texts, adapter.predict(texts, generation), strict=True):
        typer.echo(f"{one_line(label)}\t{prob:.4f}\t{one_line(t)}")


def _generation_options(max_new_tokens: int | None, sample: bool, temperature: float, top_p: float, seed: int) -> Any:
    """``fedhf predict``'s generation settings (None: the task's default, greedy), each one checked."""
    if max_new_tokens is None and not sample and (temperature, top_p, seed) == (1.0, 1.0, 0):
        return None
    if max_new_tokens is not None and not 1 <= max_new_tokens <= 4096:
        raise FedHFConfigError(f"--max-new-tokens: got {max_new_tokens}; give a whole number from 1 to 4096.")
    if not sample and (temperature, top_p, seed) != (1.0, 1.0, 0):
        raise FedHFConfigError("--temperature, --top-p and --seed shape sampling; add --sample (greedy ignores them).")
    if not temperature > 0:
        raise FedHFConfigError(f"--temperature: got {temperature}; give a number above 0 (1.0: the model's own).")
    if not 0 < top_p <= 1:
        raise FedHFConfigError(f"--top-p: got {top_p}; give a share in (0, 1] (1.0: no nucleus cut).")
    from fedhf.tasks.causal_lm import GenerationSettings

    return GenerationSettings(
        max_new_tokens=max_new_tokens or 0, do_sample=sample, temperature=temperature, top_p=top_p, seed=seed
    )


@app.command()
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="One or more finished run folders (outputs/<run-id>).")],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Report folder; default RUN_DIR/report for one run, ./fedhf-report for several."
        ),
    ] = None,
    no_privacy_utility: Annotated[
        bool,
        typer.Option("--no-privacy-utility", help="Skip the privacy-utility plot (allows runs on different datasets)."),
    ] = False,
) -> None:
    """Plots (accuracy and loss per round, epsilon per client, label distribution, privacy-utility) and report.md."""
    from fedhf.analysis.report import write_report

    target = out or (run_dirs[0] / "report" if len(run_dirs) == 1 else Path("fedhf-report"))
    try:
        md = write_report(run_dirs, target, privacy_utility=not no_privacy_utility)
    except FedHFError as exc:
        _fail(str(exc))
    typer.echo(f"report: {md}")


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (outputs/<run-id>).")],
    non_members: Annotated[
        Path | None,
        typer.Option(
            "--non-members",
            help="Rows of the same distribution no client saw (file or folder, like a silo); default: the training "
            "rows the run left out.",
        ),
    ] = None,
    max_examples: Annotated[
        int, typer.Option("--max-examples", help="Members and non-members each (a seeded sample).")
    ] = 1000,
    confidence: Annotated[
        float, typer.Option("--confidence", help="Confidence level of the epsilon lower bound.")
    ] = 0.95,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling the examples and splitting them.")] = 0,
    candidates: Annotated[
        int,
        typer.Option("--candidates", help="Random secrets each canary is ranked among (runs with audit.canaries)."),
    ] = 1000,
) -> None:
    """Membership-inference audit of the released adapter: ROC AUC, TPR at 1% FPR, empirical epsilon lower bound;
    for a generative run with audit.canaries, each canary's exposure too.

    The results go into run.json ('audit') and the model card in hub/.
    """
    _setup_logging()
    _quiet_libraries()
    from fedhf.analysis.audit import audit_lines, audit_run

    try:
        result = audit_run(
            run_dir,
            non_members_file=non_members,
            max_examples=max_examples,
            confidence=confidence,
            seed=seed,
            candidates=candidates,
        )
    except FedHFError as exc:
        _fail(str(exc))
    for line in audit_lines(result):
        typer.echo(line)
    if result.get("violation"):
        raise typer.Exit(3)


@app.command("evaluate")
def evaluate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A finished run folder (outputs/<run-id>).")],
    set_: SetOpt = None,
    no_record: Annotated[
        bool, typer.Option("--no-record", help="Print only; do not add the result to run.json.")
    ] = False,
) -> None:
    """Evaluate the released adapter on the eval split of the run's dataset, with data keys changed by --set
    (e.g. --set data.languages=orm: zero-shot on another AfriSenti language)."""
    _setup_logging()
    _quiet_libraries()
    from fedhf.analysis.evaluation import evaluate_run, parse_overrides

    try:
        result = evaluate_run(run_dir, parse_overrides(set_ or []), record=not no_record)
    except FedHFError as exc:
        _fail(str(exc))
    from fedhf.data.records import metric_names
    from fedhf.run.store import load_run

    run = load_run(run_dir)
    names = metric_names(run.dataset.format if run.dataset else None)
    where = ", ".join(f"{k}={v}" for k, v in result["data"].items()) or "the run's own eval split"
    typer.echo(
        f"{where}: {result['rows']} rows  {names.accuracy} {result['accuracy']:.4f}  {names.f1} "
        f"{result['macro_f1']:.4f}  loss {result['loss']:.4f}"
    )


@app.command()
def sweep(
    group: Annotated[
        str,
        typer.Argument(
            help="An experiment group: a folder name under experiments/ (noniid, privacy, languages, communication, "
            "audit) or a path to a group folder."
        ),
    ],
    smoke: Annotated[
        bool, typer.Option("--smoke", help="The group's small variant (a minute or two): same runs, tiny data.")
    ] = False,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where the group's runs and results go: OUT/<group>[-smoke]/.")
    ] = Path("outputs/experiments"),
    only: Annotated[
        list[str] | None, typer.Option("--only", help="Run only this run of the group (repeatable).")
    ] = None,
    list_runs: Annotated[bool, typer.Option("--list", help="List the group's runs and exit.")] = False,
) -> None:
    """Run a group of experiments (skipping finished runs), then write results.csv and results.md."""
    _setup_logging()
    _quiet_libraries()
    from fedhf.analysis.experiments import load_group, run_group

    try:
        g = load_group(group)
        if list_runs:
            typer.echo(f"{g.name}: {g.description}")
            for r in g.selected(smoke, only):
                typer.echo(
                    f"  {r.name:<22} {r.num_clients:>3} clients  {r.config.name}"
                    + (f"  {r.overrides}" if r.overrides else "")
                    + ("  +audit" if r.audit else "")
                )
            return
        folder = run_group(g, out, smoke=smoke, only=only, log=lambda m: typer.echo(m, err=True))
    except FedHFError as exc:
        _fail(str(exc))
    typer.echo((folder / "results.md").read_text())
    typer.echo(f"results: {folder / 'results.md'} and {folder / 'results.csv'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
