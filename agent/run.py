"""`python -m agent run`: one task, from a fresh workspace or from its checkpoint.

Invariants:
- Every step is checkpointed before the next starts (durability "sync");
  started again with the same arguments after any crash, the run resumes from
  the last checkpoint.
- Stops only between steps: on SIGTERM (exit 143, resumable), on a cancel
  command (exit 4, final), at the deadline or a budget (exit 0 with that outcome).
- The outcome is written to `.dockyard/result.json`; a run that finds one exits
  at once with the same code, so a redelivered or restarted Job does no work twice.
- Telemetry never blocks the loop and NATS being down never stops the run.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from agent import contract
from agent.cli import UsageError, add_nats_arguments, check_common, env_default, nats_auth, task_parser
from agent.changes import record_base

log = logging.getLogger("agent")

OUTCOME_EXIT = {
    contract.OUTCOME_DONE: contract.EXIT_DONE,
    contract.OUTCOME_BUDGET: contract.EXIT_DONE,
    contract.OUTCOME_DEADLINE: contract.EXIT_DONE,
    contract.OUTCOME_CANCELLED: contract.EXIT_CANCELLED,
    contract.OUTCOME_FAILED: contract.EXIT_FATAL,
}
PRUNE_EVERY_STEPS = 10
MIN_CONTEXT_TOKENS = 1000
# Debug hook: a file name here makes `main` write the process's modules and threads as it returns, as JSON
# (tests/agent/test_imports.py checks what a run imports and that no tracing runs unless configured).
EXIT_REPORT_ENV = contract.ENV_PREFIX + "DEBUG_EXIT_REPORT"


class FatalError(Exception):
    """What running again can never fix (an unclonable repository, a bad model, a missing key): EXIT_FATAL,
    no retry. `str()` is the reason in words; `detail` what lies behind it (git's own message)."""

    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.detail = detail


def build_parser() -> argparse.ArgumentParser:
    parser = task_parser(
        "python -m agent run",
        "Run one task with the STRATEGIC/TACTICAL agent, checkpointing every step.",
        store=False,
    )
    parser.add_argument("--task-file", default=env_default("TASK_FILE", contract.TASK_FILE), help="task JSON {prompt, repo?, model?, limits?} [DOCKYARD_TASK_FILE]")
    parser.add_argument("--model", default=env_default("MODEL"), help="model spec, e.g. scripted:example or openai:gpt-4o; overrides the task's [DOCKYARD_MODEL]")
    add_nats_arguments(parser, "telemetry and commands; none: trace to stdout")
    parser.add_argument("--home", default=env_default("HOME_DIR", contract.HOME_DIR), help="writable home for tools (PYTHONUSERBASE under it) [DOCKYARD_HOME_DIR]")
    parser.add_argument("--sandbox", choices=("bwrap", "container", "unsafe-host"), default=env_default("SANDBOX", "container"),
                        help="where commands run: bwrap (a bubblewrap sandbox, dockyard dev), container (the pod), unsafe-host (dockyard dev --unsafe-no-sandbox) [DOCKYARD_SANDBOX]")
    parser.add_argument("--egress-socket", default=env_default("EGRESS_SOCKET"), help="with --sandbox bwrap: the egress proxy's Unix socket; none: no network [DOCKYARD_EGRESS_SOCKET]")
    parser.add_argument("--secrets-dir", default=env_default("SECRETS_DIR", contract.SECRETS_DIR), help="directory of secret files [DOCKYARD_SECRETS_DIR]")
    parser.add_argument("--model-gateway", default=env_default("MODEL_GATEWAY"), help="base URL of the model gateway, which holds the model key [DOCKYARD_MODEL_GATEWAY]")
    parser.add_argument("--scripts-dir", default=env_default("SCRIPTS_DIR"), help="directory of scripted:NAME model scripts; default the bundled examples [DOCKYARD_SCRIPTS_DIR]")
    allow_file = env_default("ALLOW_FILE_REPOS", "").strip().lower() in ("1", "true", "yes")
    parser.add_argument("--allow-file-repos", action="store_true", default=allow_file, help="clone file:// repositories (one machine only) [DOCKYARD_ALLOW_FILE_REPOS]")
    parser.add_argument("--max-strategic-rounds", type=int, default=env_default("MAX_STRATEGIC_ROUNDS", "30"), help="budget [DOCKYARD_MAX_STRATEGIC_ROUNDS]")
    parser.add_argument("--max-tool-calls", type=int, default=env_default("MAX_TOOL_CALLS", "40"), help="budget per tactical phase [DOCKYARD_MAX_TOOL_CALLS]")
    parser.add_argument("--context-tokens", type=int, default=env_default("CONTEXT_TOKENS", "60000"), help="the model's view of a conversation, in estimated tokens [DOCKYARD_CONTEXT_TOKENS]")
    parser.add_argument("--deadline-seconds", type=int, default=env_default("DEADLINE_SECONDS"), help="overall deadline; default from the task's limits [DOCKYARD_DEADLINE_SECONDS]")
    parser.add_argument("--outputs-max-bytes", type=int, default=env_default("OUTPUTS_MAX_BYTES", str(contract.OUTPUTS_MAX_BYTES)),
                        help=f"all full tool outputs kept in {contract.OUTPUTS_DIR}, oldest dropped first [DOCKYARD_OUTPUTS_MAX_BYTES]")
    parser.add_argument("--keep-checkpoints", type=int, default=env_default("KEEP_CHECKPOINTS", "20"), help="checkpoints kept per thread [DOCKYARD_KEEP_CHECKPOINTS]")
    return parser


@dataclass
class Control:
    """Requests that arrive from other threads (signals, NATS commands); read between steps."""

    stop_reason: str | None = None  # "sigterm" or "cancel"
    phase: str = contract.PHASE_STRATEGIC
    step: int = 0
    todos: tuple = ()

    def request_stop(self, reason: str) -> None:
        if self.stop_reason != "cancel":  # a cancel is final and wins over a plain stop
            self.stop_reason = reason


def load_task(path: Path) -> dict:
    try:
        task = json.loads(path.read_text())
    except FileNotFoundError:
        raise FatalError(f"task file {path} does not exist; pass --task-file") from None
    except ValueError as exc:
        raise FatalError(f"task file {path} is not valid JSON: {exc}") from None
    if not isinstance(task, dict) or not isinstance(task.get("prompt"), str) or not task["prompt"].strip():
        raise FatalError(f"task file {path} needs a non-empty 'prompt'")
    return task


def result_path(workspace: Path) -> Path:
    return workspace / contract.RESULT_FILE


def read_result(workspace: Path) -> dict | None:
    try:
        return json.loads(result_path(workspace).read_text())
    except (FileNotFoundError, ValueError):
        return None


def write_result(workspace: Path, result: dict) -> None:
    path = result_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, path)


def clone_repo(repo: dict, workspace: Path, env: dict, *, allow_file: bool = False, wrap=None) -> None:
    """Clone over https or ssh only (git's GIT_ALLOW_PROTOCOL, submodules included); file:// when `allow_file`.
    `wrap(argv, cwd, env, read_only) -> (argv, env)` runs git where the task's commands run (WorkTools.wrap)."""
    scheme = urlsplit(repo["url"]).scheme
    if scheme == "file" and not allow_file:
        raise FatalError(f"repository {repo['url']!r}: file:// repositories are disabled (dockyard dev --allow-file-repos)")
    env = {**env, "GIT_ALLOW_PROTOCOL": "https:ssh" + (":file" if allow_file else "")}
    target = workspace / contract.REPO_DIR
    if target.exists():
        return
    staging = workspace / (contract.REPO_DIR + ".partial")
    subprocess.run(["rm", "-rf", str(staging)], check=False)
    read_only = (Path(urlsplit(repo["url"]).path),) if scheme == "file" else ()
    if read_only and not read_only[0].exists():  # else the sandbox fails to mount it, which looks transient
        raise FatalError("git clone failed: repository not found", f"{repo['url']}: no such path on this machine")

    def git(*args: str, timeout: int) -> str:
        argv, start_env = (["git", *args], env) if wrap is None else wrap(["git", *args], workspace, env, read_only)
        return subprocess.run(argv, check=True, env=start_env, capture_output=True, text=True, timeout=timeout).stdout

    git("clone", "--quiet", "--", repo["url"], str(staging), timeout=600)
    if repo.get("ref"):
        git("-C", str(staging), "checkout", "--quiet", repo["ref"], timeout=120)
    # Recorded before the rename: a restart after it finds both, one before it clones again.
    record_base(workspace, repo, git("-C", str(staging), "rev-parse", "HEAD", timeout=60))
    os.replace(staging, target)


# What git prints when retrying cannot help, in words a person understands (git's own messages,
# lower-cased; HTTP errors as git's http transport reports them).
_PERMANENT_GIT_FAILURES = (
    (re.compile(r"repository '.*' not found|repository not found|returned error: 404"), "repository not found"),
    (re.compile(r"does not appear to be a git repository|not a git repository"), "not a git repository"),
    (re.compile(r"could not resolve host|name or service not known|no address associated with hostname"), "host unknown"),
    (re.compile(r"received http code 403 from proxy|connect tunnel failed, response 403"),
     "refused by the egress proxy: the host is not on its allowlist (knative/squid/allowlist.txt)"),
    (re.compile(r"authentication failed|could not read username|could not read password|permission denied \(publickey"
                r"|returned error: 40[13]|host key verification failed"), "access refused"),
    (re.compile(r"did not match any file\(s\) known to git|remote branch .* not found|invalid reference|unknown revision"),
     "no such branch, tag or commit"),
)


def permanent_git_failure(stderr: str) -> str | None:
    """Why a failed clone or checkout can never succeed, or None when it might (timeouts, resets, 5xx)."""
    text = (stderr or "").lower()
    for pattern, why in _PERMANENT_GIT_FAILURES:
        if pattern.search(text):
            return why
    return None


def _model_not_found(exc: BaseException) -> bool:  # LangChain's ModelNotFoundError, or an SDK's 404 NotFoundError
    from langchain_core.exceptions import ModelNotFoundError

    return isinstance(exc, ModelNotFoundError) or (type(exc).__name__ == "NotFoundError" and getattr(exc, "status_code", None) == 404)


def _load_model(spec: str, secrets_dir: Path, scripts_dir: str | None, gateway: str | None = None):
    """The model for `spec`; a configuration that cannot work is fatal (no retry)."""
    from agent.models import EXAMPLES_DIR, ModelConfigError, load_model

    try:
        return load_model(spec, secrets_dir=secrets_dir, scripts_dir=Path(scripts_dir) if scripts_dir else EXAMPLES_DIR, gateway=gateway)
    except ModelConfigError as exc:
        raise FatalError(str(exc)) from None


def _write_exit_report(path: str) -> None:
    """The debug hook's report: modules loaded, threads alive, live objects of tracing classes, the collector's state."""
    import threading
    from collections import Counter

    collector = {"enabled": gc.isenabled(), "frozen": gc.get_freeze_count(), "collections": [g["collections"] for g in gc.get_stats()]}
    kinds = (f"{type(obj).__module__}.{type(obj).__qualname__}" for obj in gc.get_objects())
    tracing = Counter(kind for kind in kinds if kind.startswith(("langsmith.", "langchain_core.tracers.")))
    report = {
        "modules": sorted(sys.modules),
        "threads": sorted(thread.name for thread in threading.enumerate()),
        "tracing_objects": dict(sorted(tracing.items())),
        "gc": collector,
    }
    Path(path).write_text(json.dumps(report))


def main(argv: list[str] | None = None) -> int:
    # Start-up makes most of the objects a run will ever hold (the libraries' modules, classes,
    # pydantic schemas); each collection during it walks them all again, for nothing. None runs
    # until the graph is built: `Run.execute` then freezes what exists (moved to the permanent
    # generation, never walked again) and turns collection back on, like functions' quiet_gc.
    gc.disable()
    try:
        return _main(argv)
    finally:
        if os.environ.get(EXIT_REPORT_ENV):  # before the line below: it shows the run's own collector state
            _write_exit_report(os.environ[EXIT_REPORT_ENV])
        gc.enable()  # for an early return; a run has turned it on already


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        check_common(args)
        if args.context_tokens < MIN_CONTEXT_TOKENS:
            raise UsageError(f"--context-tokens must be at least {MIN_CONTEXT_TOKENS}, got {args.context_tokens}")
        if args.outputs_max_bytes < 0:
            raise UsageError(f"--outputs-max-bytes must be 0 or more, got {args.outputs_max_bytes}")
        auth = nats_auth(args)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    workspace = Path(args.workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)

    previous = read_result(workspace)
    if previous is not None:
        print(f"agent: task {args.task_id} already ended with outcome {previous.get('outcome')}", file=sys.stderr)
        return OUTCOME_EXIT.get(previous.get("outcome"), contract.EXIT_DONE)

    from agent.redact import Redactor
    from agent.telemetry import Telemetry

    # The NATS credentials are secrets too: every line of the file (JWT, seed) is redacted.
    redactor = Redactor.from_secrets_dir(Path(args.secrets_dir), extra_file=auth.secrets_file)
    telemetry = Telemetry(args.task_id, args.nats, redactor=redactor, auth=auth)
    telemetry.start()
    handler = telemetry.log_handler()
    logging.getLogger().addHandler(handler)
    try:
        return Run(args, workspace, telemetry).execute()
    except FatalError as exc:
        log.error("fatal: %s", exc)
        failure = {"reason": str(exc), "failure_class": contract.FAILURE_FATAL, "detail": exc.detail or str(exc)}
        telemetry.event(contract.EV_STATUS, state=contract.STATE_FINISHED, outcome=contract.OUTCOME_FAILED, **failure)
        write_result(workspace, {"task_id": args.task_id, "outcome": contract.OUTCOME_FAILED, "summary": str(exc), **failure})
        print(f"agent: fatal: {exc}", file=sys.stderr)
        return contract.EXIT_FATAL
    except Exception as exc:
        log.exception("task %s failed (%s); the Job retries it from the checkpoint", args.task_id, type(exc).__name__)
        return contract.EXIT_RETRY
    finally:
        logging.getLogger().removeHandler(handler)
        telemetry.close()


class Run:
    def __init__(self, args, workspace: Path, telemetry):
        self.args = args
        self.task_id: str = args.task_id
        self.workspace = workspace
        self.telemetry = telemetry
        self.control = Control()

    # --- commands from NATS (telemetry thread) and signals -----------------
    def on_command(self, body: dict) -> dict | None:
        op = body.get("op")
        if op == "status":
            c = self.control
            return {"ok": True, "phase": c.phase, "step": c.step, "todos": list(c.todos)}
        if op == "cancel":
            self.control.request_stop("cancel")
            return {"ok": True, "detail": "stopping after the current step"}
        if op == "message":
            text = body.get("text")
            if not isinstance(text, str) or not text.strip():
                return {"ok": False, "error": "message needs a non-empty 'text'"}
            self.inbox.append(text)  # on disk before the ack: a message is never lost
            self.telemetry.event(contract.EV_MESSAGE, text=text)
            return {"ok": True, "detail": "delivered to the next strategic phase"}
        if op == "snapshot":
            return None  # the snapshotter answers these
        return {"ok": False, "error": f"unknown op {op!r}; use status, cancel or message"}

    def _on_sigterm(self, signum, frame) -> None:
        self.control.request_stop("sigterm")

    # --- the run ---------------------------------------------------------------
    def execute(self) -> int:
        from agent.checkpoint import WalCheckpointer, open_saver
        from agent.graph import Budgets, Deps, Inbox, build_graph, initial_state
        from agent.heartbeat import Heartbeat
        from agent.outputs import OutputStore
        from agent.tools import WorkTools
        from agent.transcript import Transcript

        args = self.args
        task = load_task(Path(args.task_file))
        model_spec = self.model_spec = args.model or task.get("model") or "scripted:example"
        deadline_seconds = int(args.deadline_seconds or (task.get("limits") or {}).get("deadline_seconds") or 3600)
        home = Path(args.home)
        home.mkdir(parents=True, exist_ok=True)
        model = _load_model(model_spec, Path(args.secrets_dir), args.scripts_dir, args.model_gateway)

        proxy_env = {k: v for k, v in os.environ.items() if k.lower() in ("http_proxy", "https_proxy", "no_proxy")}
        tools = WorkTools(self.workspace, home, proxy_env=proxy_env, sandbox=self._sandbox(home), outputs=OutputStore(self.workspace, args.outputs_max_bytes))
        self.inbox = Inbox(self.workspace / ".dockyard" / "inbox.jsonl")
        heartbeat = Heartbeat(self.workspace / contract.HEARTBEAT_FILE).start()
        database = self.workspace / contract.checkpoint_path(self.task_id)
        saver = open_saver(database, autocheckpoint=False)  # WalCheckpointer's thread copies the WAL instead
        self.wal = WalCheckpointer(database).start()  # a daemon: a WAL left at exit is read by every reader
        deps = Deps(
            model=model,
            tools=tools,
            reporter=self.telemetry,
            inbox=self.inbox,
            budgets=Budgets(args.max_strategic_rounds, args.max_tool_calls, args.context_tokens),
            waiting=heartbeat.waiting,
            transcript=Transcript.open(database, autocheckpoint=False),
        )
        graph = build_graph(deps, checkpointer=saver)
        config = {"configurable": {"thread_id": self.task_id}, "recursion_limit": 100_000}

        snapshot = graph.get_state(config)
        if isinstance(snapshot.values.get("strategic"), list):  # messages in the state: before the transcript
            raise FatalError("the checkpoint was written by a dockyard older than the transcript and cannot be resumed; submit the task again")
        gc.freeze()  # start-up is over (see main): what it made lives as long as the process
        gc.enable()
        resumed = bool(snapshot.values)
        started_at = float((snapshot.metadata or {}).get("dockyard_started_at") or 0) if resumed else 0.0
        started_at = self._started_at(started_at)
        self.telemetry.on_command(self.on_command)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        signal.signal(signal.SIGINT, self._on_sigterm)

        if resumed:
            self._announce_resume(snapshot.values)
        else:
            self._announce_start(task, model_spec, tools)

        stream_input = None if resumed else initial_state(task["prompt"])
        updates = graph.stream(stream_input, config, durability="sync", stream_mode="updates")
        outcome = self._drive(updates, heartbeat, saver, started_at, deadline_seconds)

        if self.control.stop_reason == "sigterm":
            log.info("stopped by SIGTERM after step %d; the next start resumes from the checkpoint", self.control.step)
            self.telemetry.event(contract.EV_STATUS, state=contract.STATE_INTERRUPTED, reason="SIGTERM")
            return contract.EXIT_INTERRUPTED
        return self._finish(graph.get_state(config).values, saver, outcome, deadline_seconds)

    def _announce_resume(self, values: dict) -> None:
        """Take phase and todos from the checkpoint, so status commands answer right before the first step."""
        self.control.phase, self.control.todos = values.get("phase", self.control.phase), tuple(values.get("todos", ()))
        log.info("resuming task %s from its checkpoint (%d model turns, %d tool calls done)", self.task_id, values.get("model_turns", 0), values.get("tool_calls", 0))
        self.telemetry.event(contract.EV_STATUS, state=contract.STATE_RESUMED, phase=self.control.phase, model_turns=values.get("model_turns", 0), tool_calls=values.get("tool_calls", 0))

    def _announce_start(self, task: dict, model_spec: str, tools) -> None:
        """A fresh start: `started` (a clone that fails was an attempt too), then the clone, then the first phase."""
        log.info("starting task %s with model %s", self.task_id, model_spec)
        self.telemetry.event(contract.EV_STATUS, state=contract.STATE_STARTED, model=model_spec)
        repo = task.get("repo")
        if repo:
            self._clone(repo, tools)
        self.telemetry.event(contract.EV_PHASE, phase=contract.PHASE_STRATEGIC)

    def _drive(self, updates: Generator[dict, None, None], heartbeat, saver, started_at: float, deadline_seconds: int) -> str | None:
        """Run the graph step by step; stop between steps on a stop request or at the deadline.

        Returns OUTCOME_DEADLINE when the deadline stopped it, else None (the
        outcome is then in the state, or in `control.stop_reason`).
        """
        from agent.checkpoint import prune
        from agent.models import ModelConfigError

        try:
            with closing(updates):  # a stop ends the stream here, before the heartbeat stops
                for update in updates:
                    self.wal.nudge()
                    heartbeat.beat()
                    self.control.step += 1
                    self._track(update)
                    if self.control.step % PRUNE_EVERY_STEPS == 0:
                        prune(saver, self.task_id, keep=self.args.keep_checkpoints)
                    if self.control.stop_reason:
                        return None
                    if time.time() - started_at > deadline_seconds:
                        return contract.OUTCOME_DEADLINE
        except Exception as exc:  # a bad configuration or model name fails the next try the same way
            if isinstance(exc, ModelConfigError) or _model_not_found(exc):
                words = str(exc) if isinstance(exc, ModelConfigError) else f"model {self.model_spec} is not known to its provider"
                raise FatalError(words, str(exc)) from None
            raise
        finally:
            heartbeat.stop()
        return None

    def _track(self, update: dict) -> None:
        """Mirror a step's phase and todos into `control`, for status commands from the telemetry thread."""
        for node_update in update.values():
            if isinstance(node_update, dict):
                self.control.phase = node_update.get("phase", self.control.phase)
                self.control.todos = tuple(node_update.get("todos", self.control.todos))

    def _finish(self, values: dict, saver, outcome: str | None, deadline_seconds: int) -> int:
        """Write the result file and report it; the exit code follows from the outcome."""
        from agent.checkpoint import prune

        prune(saver, self.task_id, keep=self.args.keep_checkpoints)
        failure: dict = {}
        if self.control.stop_reason == "cancel":
            outcome, summary = contract.OUTCOME_CANCELLED, "cancelled by command"
        elif outcome == contract.OUTCOME_DEADLINE:
            summary = f"stopped at the deadline of {deadline_seconds} s, counted from the first start"
            failure = {"reason": summary, "failure_class": contract.FAILURE_TRANSIENT, "deadline_seconds": deadline_seconds}
        else:
            outcome, summary = values.get("outcome") or contract.OUTCOME_FAILED, values.get("summary") or ""
            if outcome == contract.OUTCOME_BUDGET:  # the same task runs into the same budget again
                failure = {"reason": summary.removeprefix("stopped: ") or "a budget is spent", "failure_class": contract.FAILURE_FATAL}
        result = {
            "task_id": self.task_id,
            "outcome": outcome,
            "summary": summary,
            "todos": values.get("todos", []),
            "model_turns": values.get("model_turns", 0),
            "tool_calls": values.get("tool_calls", 0),
            "finished_at": time.time(),
            **failure,
        }
        write_result(self.workspace, result)
        self.telemetry.event(contract.EV_RESULT, outcome=outcome, summary=summary)
        self.telemetry.event(contract.EV_STATUS, state=contract.STATE_FINISHED, outcome=outcome, summary=summary, **failure)
        log.info("task %s finished: %s", self.task_id, outcome)
        return OUTCOME_EXIT.get(outcome, contract.EXIT_DONE)

    def _sandbox(self, home: Path):
        """The bubblewrap sandbox of `--sandbox bwrap`; None where the container is the boundary.
        `unsafe-host` warns, in the log and the task's trace, at every start."""
        from agent.sandbox import MODE_BWRAP, MODE_UNSAFE_HOST, UNSAFE_WARNING, Sandbox, SandboxUnavailable, check

        if self.args.sandbox == MODE_UNSAFE_HOST:
            log.warning("%s", UNSAFE_WARNING)
            self.telemetry.event(contract.EV_WARNING, reason="unsafe_no_sandbox", message=UNSAFE_WARNING)
        if self.args.sandbox != MODE_BWRAP:
            return None
        socket = Path(self.args.egress_socket) if self.args.egress_socket else None
        try:
            binary = check(egress=socket is not None)
        except SandboxUnavailable as exc:
            raise FatalError(str(exc)) from None
        return Sandbox(self.workspace, home, socket, bwrap=binary)

    def _started_at(self, known: float) -> float:
        """The first start time, kept in the workspace so the deadline survives restarts."""
        path = self.workspace / contract.STARTED_AT_FILE
        try:
            return float(path.read_text())
        except (FileNotFoundError, ValueError):
            now = known or time.time()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{now}\n")
            return now

    def _clone(self, repo: dict, tools) -> None:
        log.info("cloning %s", repo.get("url"))
        try:
            clone_repo(repo, self.workspace, tools.environment(), allow_file=self.args.allow_file_repos, wrap=tools.wrap)
        except subprocess.CalledProcessError as exc:
            # Redacted before it is cut: git may echo a URL with its password.
            detail = self.telemetry.redactor.cut(exc.stderr.strip(), 500)
            why = permanent_git_failure(exc.stderr)
            if why:  # retrying cannot help: fail now, in words, instead of after every retry
                step = f"checkout of ref {repo.get('ref')!r}" if "checkout" in exc.cmd else "clone"
                raise FatalError(f"git {step} failed: {why}", detail) from None
            raise RuntimeError(f"git clone of {repo.get('url')} failed: {detail}") from None
