"""No secrets in logs or artifacts: with tokens and passwords in the environment and a DVC remote password in
``.dvc/config.local``, a tiny pipeline run (every stage as a Prefect flow), its failure paths (a missing local
generator, an unreachable hub id in a separate process at DEBUG log level, a failed ``dvc push``) leave none of
them in the console output, in any file of the workspace, or on the Prefect server (flow and task runs, states,
logs, artifacts, and the server's database file itself). The package source never dumps the environment."""
from __future__ import annotations

import ast
import base64
import io
import logging
import os
import secrets
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import yaml

from tests.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = [f for d in ("thinair", "tasks", "flows") for f in sorted((ROOT / d).rglob("*.py"))]

# Secret-looking variables a thinair user plausibly has set. The PREFECT_* auth values are accepted and ignored
# by the test server (it was started without an auth string), so the runs behave as usual.
SECRET_VARS = {"HF_TOKEN": "hf_", "HUGGING_FACE_HUB_TOKEN": "hf_", "PREFECT_API_KEY": "pnu_",
               "PREFECT_API_AUTH_STRING": "thinair:", "PREFECT_SERVER_API_AUTH_STRING": "thinair:",
               "AWS_SECRET_ACCESS_KEY": "", "WANDB_API_KEY": ""}


def _new_secrets() -> dict[str, str]:
    """{name: value}: each value holds its own random 24-hex core (what the scan looks for)."""
    return {name: f"{prefix}{secrets.token_hex(12)}" for name, prefix in
            {**SECRET_VARS, "DVC_REMOTE_PASSWORD": ""}.items()}


def _needles(values: dict[str, str]) -> dict[str, list[bytes]]:
    """What would betray each secret: its random core (also inside a longer string) and its base64 form (an
    Authorization header written out)."""
    return {name: [v[-24:].encode(), base64.b64encode(v.encode())] for name, v in values.items()}


def find_leaks(needles: dict[str, list[bytes]], where: str, content: str | bytes) -> list[str]:
    data = content.encode("utf-8", "backslashreplace") if isinstance(content, str) else content
    return [f"{name} in {where}" for name, ns in needles.items() if any(n in data for n in ns)]


def scan_tree(top: Path, needles: dict[str, list[bytes]], skip: tuple[Path, ...] = ()) -> tuple[list[str], int]:
    """Leaks in every regular file under `top` (raw bytes: JSON, CSV, HTML, npz, safetensors, sqlite ...)."""
    found, n = [], 0
    for f in sorted(top.rglob("*")):
        if f.is_file() and not f.is_symlink() and f not in skip:
            n += 1
            found += find_leaks(needles, str(f.relative_to(top)), f.read_bytes())
    return found, n


def _paged(read, **kw) -> list:
    out = []
    while True:
        page = read(limit=200, offset=len(out), **kw)
        out += page
        if len(page) < 200:
            return out


def server_records(since: datetime) -> dict[str, str]:
    """Everything the Prefect server holds about the flow runs started since `since`, as JSON texts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas import filters as F
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all()
    EventsWorker.drain_all()
    texts = {}
    with get_client(sync_client=True) as client:
        runs = _paged(client.read_flow_runs, flow_run_filter=F.FlowRunFilter(
            start_time=F.FlowRunFilterStartTime(after_=since)))
        ids = [r.id for r in runs]
        for r in runs:
            texts[f"flow run {r.name} ({r.flow_id})"] = r.model_dump_json()
            texts[f"states of flow run {r.name}"] = "\n".join(s.model_dump_json() for s in
                                                              client.read_flow_run_states(r.id))
        for t in _paged(client.read_task_runs, task_run_filter=F.TaskRunFilter(
                flow_run_id=F.TaskRunFilterFlowRunId(any_=ids))):
            texts[f"task run {t.name}"] = t.model_dump_json()
        logs = _paged(client.read_logs, log_filter=F.LogFilter(timestamp=F.LogFilterTimestamp(after_=since)))
        texts["flow and task run logs"] = "\n".join(g.model_dump_json() for g in logs)
        for a in _paged(client.read_artifacts, artifact_filter=F.ArtifactFilter(
                flow_run_id=F.ArtifactFilterFlowRunId(any_=ids))):
            texts[f"artifact {a.key}"] = a.model_dump_json()
        flows = {client.read_flow(r.flow_id).name for r in runs}
    return texts | {"_flows": " ".join(sorted(flows)), "_logs": str(len(logs))}


def _dvc_project(ws: Path, password: str) -> None:
    """A DVC repo with a password-protected (unreachable) default HTTP remote in config.local, as DVC's docs
    advise for credentials, and one tracked file so that `dvc push` has something to send."""
    from dvc.repo import Repo

    from thinair import dvcrun

    Repo.init(str(ws), no_scm=True)
    (ws / ".dvc" / "config.local").write_text(
        "[core]\n    remote = vault\n['remote \"vault\"']\n    url = http://127.0.0.1:9/thinair\n"
        f"    auth = basic\n    user = thinair\n    password = {password}\n")
    (ws / "notes.txt").write_text("tracked by DVC\n")
    with dvcrun.repo(ws) as r:
        r.add("notes.txt")


def test_no_secret_reaches_output_files_logs_or_the_prefect_server(prefect_server, tiny_generator, tmp_path,
                                                                   monkeypatch, capfd, caplog):
    import prefect.settings

    from thinair.cli import main
    from thinair.flows import pipeline

    values = _new_secrets()
    needles = _needles(values)
    for name in SECRET_VARS:
        monkeypatch.setenv(name, values[name])
    caplog.set_level(logging.DEBUG)
    since = datetime.now(timezone.utc)
    ws = tmp_path / "ws"
    ws.mkdir()
    _dvc_project(ws, values["DVC_REMOTE_PASSWORD"])
    f = ws / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator, cas={"seeds": 1, "scale_synthetic": [],
                                                                  "scale_real": []})))
    base = ["--params", str(f), "--root", str(ws)]
    for stage in ("ingest", "encode", "invert", "sample", "metrics", "cas", "report"):
        assert main(base + [stage]) == 0, capfd.readouterr().err[-3000:]
    # failure paths: their messages, tracebacks and failed states
    assert main(base + ["-S", f"base.generator={tmp_path / 'no-such-generator'}", "encode"]) == 1
    monkeypatch.setattr(pipeline, "push_task", pipeline.push_task.with_options(retries=0))
    assert main(["--root", str(ws), "pipeline", "--force", "--push"]) == 1  # the remote is unreachable
    # a fresh process: Prefect and huggingface_hub read the secrets from its environment at start-up
    env = dict(os.environ, PREFECT_API_URL=prefect.settings.PREFECT_API_URL.value(), THINAIR_LOG_LEVEL="DEBUG",
               PREFECT_LOGGING_LEVEL="DEBUG", HF_HUB_OFFLINE="1")
    hub = subprocess.run([sys.executable, "-m", "thinair.cli"] + base + ["-S", "base.generator=thinair-test/private",
                         "encode"], env=env, capture_output=True, text=True, timeout=300)
    assert hub.returncode == 1 and "thinair-test/private" in hub.stderr, hub.stderr[-3000:]

    out = capfd.readouterr()
    texts = {"stdout": out.out, "stderr": out.err, "log records": caplog.text,
             "subprocess stdout": hub.stdout, "subprocess stderr": hub.stderr}
    assert "no-such-generator" in out.err and "thinair pipeline: failed" in out.err  # the error paths ran
    found = [leak for where, text in texts.items() for leak in find_leaks(needles, where, text)]

    # every file of the workspace (stage outputs, manifests, provenance, report, .thinair/ work dirs, caches and
    # Prefect result records, DVC's cache and tmp) but the one file that holds the DVC password by design
    config_local = ws / ".dvc" / "config.local"
    leaks, n_files = scan_tree(ws, needles, skip=(config_local,))
    found += leaks
    assert n_files > 50 and (ws / "data" / "sample" / "provenance.csv").is_file()
    assert any((ws / ".thinair" / "prefect" / "results").iterdir())
    assert scan_tree(ws, needles)[0] == ["DVC_REMOTE_PASSWORD in .dvc/config.local"]  # the scan sees files

    # the Prefect server: what its API returns, then its database and PREFECT_HOME as raw bytes
    records = server_records(since)
    assert {"ingest", "encode", "invert", "sample", "metrics", "cas", "report", "pipeline"} <= \
        set(records.pop("_flows").split())
    assert int(records.pop("_logs")) > 20 and any(k.startswith("artifact cas") for k in records)
    found += [leak for where, text in records.items() for leak in find_leaks(needles, f"server: {where}", text)]
    db = Path(prefect.settings.get_current_settings().server.database.connection_url.get_secret_value()
              .split("///", 1)[1])
    assert db.is_file()
    for part in sorted(db.parent.glob(db.name + "*")):  # the database, its -wal and -shm
        found += find_leaks(needles, f"server database {part.name}", part.read_bytes())
    found += scan_tree(Path(os.environ["PREFECT_HOME"]), needles)[0]
    assert not found, f"secrets leaked: {found}"


def test_the_scan_finds_a_planted_secret(tmp_path):
    values = _new_secrets()
    needles = _needles(values)
    ws = tmp_path / "ws"
    (ws / "data" / "report").mkdir(parents=True)
    (ws / "data" / "report" / "index.html").write_text(f"<p>token={values['HF_TOKEN']}</p>")
    (ws / ".thinair" / "prefect" / "results").mkdir(parents=True)
    (ws / ".thinair" / "prefect" / "results" / "k").write_bytes(b"\x00\x93NUMPY" + values["WANDB_API_KEY"][-24:]
                                                                .encode() + b"\xff")
    (ws / "clean.json").write_text('{"a": 1}')
    auth = "Authorization: Basic " + base64.b64encode(values["PREFECT_API_AUTH_STRING"].encode()).decode()
    found, n = scan_tree(ws, needles)
    assert n == 3
    assert sorted(found) == ["HF_TOKEN in data/report/index.html", "WANDB_API_KEY in .thinair/prefect/results/k"]
    assert find_leaks(needles, "log", f"GET /api 200 {auth}") == ["PREFECT_API_AUTH_STRING in log"]
    assert find_leaks(needles, "log", f"dump: {dict(os.environ, **values)}") == \
        [f"{name} in log" for name in values]
    assert find_leaks(needles, "log", "thinair encode: done in 1.0s") == []


def test_the_log_filter_masks_secret_environment_values(monkeypatch):
    from thinair import redact

    values = _new_secrets()
    env = {"HF_TOKEN": values["HF_TOKEN"], "PREFECT_API_AUTH_STRING": values["PREFECT_API_AUTH_STRING"],
           "WANDB_API_KEY": "tiny", "HOME": "/home/someone/projects", "DO_NOT_TRACK": "1"}
    masked = redact.secret_values(env)
    assert values["HF_TOKEN"] in masked and "tiny" not in masked and "/home/someone/projects" not in masked
    monkeypatch.setattr(os, "environ", env)  # install() reads the environment as it is then
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("tests.secrets.redact")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(handler)
    try:
        filt = redact.install()
        assert filt in handler.filters and redact.install() in handler.filters and len(handler.filters) == 1
        child = logging.getLogger("tests.secrets.redact.websockets")
        auth = values["PREFECT_API_AUTH_STRING"]
        child.warning("> Authorization: Basic %s", base64.b64encode(auth.encode()).decode())
        child.warning("> TEXT %r", '{"type":"auth","token":"%s"}' % auth)
        try:
            raise RuntimeError(f"401 for token {values['HF_TOKEN']}")
        except RuntimeError:
            logger.exception("download failed")
        logger.warning("ordinary %s line in %s", "HOME", env["HOME"])
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert find_leaks(_needles(values), "log", text) == []
    assert text.count(redact.MASK) == 3 and "RuntimeError: 401 for token ***" in text
    assert "ordinary HOME line in /home/someone/projects" in text


def test_passwords_inside_urls_of_any_variable_are_masked():
    from thinair import redact

    env = {"HTTPS_PROXY": "http://bob:hunter22@proxy:3128", "PREFECT_API_URL": "https://u:s3cr3t-pw@prefect.example/api",
           "PLAIN_URL": "http://127.0.0.1:4200/api", "RATIO": "a:b"}
    masked = redact.secret_values(env)
    assert {"hunter22", "s3cr3t-pw"} <= set(masked) and not {"4200/api", "b", "bob", "u"} & set(masked)


# ---- the source: the environment is only ever read one named variable at a time ----------------------------

ENV_ONE_KEY = {"get", "setdefault", "pop", "update", "__setitem__", "__contains__"}


def _child_process_env(node, parent) -> bool:
    """``env=os.environ``, ``env=dict(os.environ, X=...)``, ``env=os.environ.copy()``: a child's environment."""
    up = parent.get(node)
    if isinstance(up, ast.Call) and ast.unparse(up.func) == "dict" and up.args and up.args[0] is node:
        node = up
    elif isinstance(up, ast.Attribute) and up.attr == "copy" and isinstance(parent.get(up), ast.Call):
        node = parent[up]
    return isinstance(parent.get(node), ast.keyword) and parent[node].arg == "env"


def environment_dumps(source: str, name: str = "<source>") -> tuple[list[str], int]:
    """Uses of ``os.environ`` (or a name bound to it) that can expose more than one named variable: copying,
    iterating, printing, logging or serialising it, passing it anywhere but a child process's ``env=``; and
    ``os.path.expandvars`` (which would put environment values into params or paths that are logged and written
    to manifests). Returns (those uses, how many uses there are in all)."""
    tree = ast.parse(source)
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    aliases = {"os.environ", "os.environb"}
    aliases |= {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "os" for a in node.names if a.name in ("environ", "environb")}
    for _ in range(3):  # `env = os.environ`, then `e2 = env` ...
        aliases |= {t.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                    and ast.unparse(node.value) in aliases for t in node.targets if isinstance(t, ast.Name)}
    bad, uses = [], 0
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("expandvars"):
            bad.append(f"{name}:{node.lineno}: {ast.unparse(node)}")
        if not isinstance(node, (ast.Name, ast.Attribute)) or ast.unparse(node) not in aliases \
                or isinstance(node.ctx, ast.Store):  # (binding an alias: its uses are checked)
            continue
        uses += 1
        up = parent.get(node)
        ok = _child_process_env(node, parent) \
            or (isinstance(up, ast.Attribute) and up.attr in ENV_ONE_KEY and isinstance(parent.get(up), ast.Call)
              and parent[up].func is up) \
            or (isinstance(up, ast.Subscript) and up.value is node) \
            or (isinstance(up, ast.Compare) and node in up.comparators
                and all(isinstance(op, (ast.In, ast.NotIn)) for op in up.ops)) \
            or (isinstance(up, ast.Assign) and up.value is node and all(isinstance(t, ast.Name) for t in up.targets))
        if not ok:
            bad.append(f"{name}:{node.lineno}: {ast.unparse(up) if up else ast.unparse(node)}")
    return bad, uses


def test_the_package_never_dumps_the_environment():
    bad, uses = [], 0
    for f in PACKAGE:
        if f.relative_to(ROOT).as_posix() == "thinair/redact.py":
            continue  # it reads every secret-looking variable in order to mask it (tested below)
        found, n = environment_dumps(f.read_text(), str(f.relative_to(ROOT)))
        bad, uses = bad + found, uses + n
    assert bad == []
    assert uses >= 5, "the scan found (almost) no os.environ at all: it is broken"


def test_the_environment_check_catches_dumps_and_allows_single_variables():
    allowed = """
import os
from os import environ
level = os.environ.get("THINAIR_LOG_LEVEL", "INFO")
env = os.environ
env.setdefault("DO_NOT_TRACK", "1")
os.environ["PREFECT_API_URL"] = url
os.environ.update(extra or {})
os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
if "HF_HUB_OFFLINE" in os.environ and environ["X"]:
    pass
"""
    assert environment_dumps(allowed) == ([], 9)
    dumps = ["log.info('env: %s', dict(os.environ))", "print(os.environ)", "json.dumps({**os.environ})",
             "for k, v in os.environ.items(): log.debug('%s=%s', k, v)", "x = os.environ.copy()",
             "env = os.environ\nlog.debug(env)", "e = os.environ\ne2 = e\nrecord(e2.items())",
             "from os import environ\nf'{environ}'", "from os import environ as E\nstr(E)",
             "p = os.path.expandvars(params.base.generator)",
             "manifest['env'] = {k: os.environ[k] for k in os.environ}"]
    for src in dumps:
        assert environment_dumps("import os\n" + src)[0], src
    for src in ("subprocess.run(cmd, env=os.environ)", "subprocess.run(cmd, env=dict(os.environ, X='1'))",
                "Popen(cmd, env=os.environ.copy())"):  # a child process inherits it anyway: not a dump
        assert environment_dumps("import os\n" + src) == ([], 1), src
