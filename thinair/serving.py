"""`thinair server | serve | pipeline | regenerate`: the Prefect server, the deployments, and whole-DAG runs.

* ``thinair server``: ``prefect server start`` bound to 127.0.0.1:4200 (UI included, analytics off).
* ``thinair serve``: serves two deployments from this project directory, without a work pool:
  ``pipeline/thinair`` (run it from the UI or ``prefect deployment run 'pipeline/thinair' --param ...``)
  and ``regenerate/scheduled`` (every ``--interval`` seconds or on ``--cron``).
* ``thinair pipeline`` / ``thinair regenerate``: run those flows once, here.
Writes nothing itself; the flows write what ``dvc repro`` would (see flows/pipeline.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from thinair.config import ParamsError

EXIT_PARAMS, EXIT_FAILED = 2, 1


def _server(args) -> int:
    from thinair.orchestration import configure

    configure()
    if args.host not in ("127.0.0.1", "localhost", "::1") and not os.environ.get("PREFECT_SERVER_API_AUTH_STRING"):
        print(f"thinair server: binding to {args.host} exposes the API and UI without a password. Set "
              "PREFECT_SERVER_API_AUTH_STRING='user:password' (and PREFECT_API_AUTH_STRING for clients) first.",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"Prefect UI: http://{args.host}:{args.port}   then, in another shell:\n"
          f"  export PREFECT_API_URL=http://{args.host}:{args.port}/api\n  thinair serve", flush=True)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", args.host, "--port", str(args.port)]
    os.execvp(cmd[0], cmd)
    return 0  # not reached


def deployments(root: str, interval: int | None = 3600, cron: str | None = None, push: bool = True) -> list:
    """The two deployments `thinair serve` serves, for the project at `root`."""
    from thinair.flows.pipeline import pipeline_flow, regenerate_flow

    root = str(Path(root).resolve())
    schedule = {"cron": cron} if cron else {"interval": interval}
    return [
        pipeline_flow.to_deployment(name="thinair", parameters={"root": root}, tags=["thinair"],
                                    description="The whole Diffusion Inversion pipeline; edit the params and run. "
                                    "Only the stages your changes make stale are re-run (dvc.lock is updated)."),
        regenerate_flow.to_deployment(name="scheduled", parameters={"root": root, "push": push}, tags=["thinair"],
                                      description="Re-run exactly the stale stages after a params/code/data change, "
                                      "then dvc push; does nothing on an unchanged workspace.", **schedule),
    ]


def _serve(args) -> int:
    from prefect import serve
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        print("thinair serve: no Prefect server configured. Start one with `thinair server` and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api (a temporary server would vanish with this process).",
              file=sys.stderr)
        return EXIT_FAILED
    serve(*deployments(args.root, args.interval, args.cron, not args.no_push))
    return 0


def main(args) -> int:
    from thinair.orchestration import configure

    if args.command == "server":
        return _server(args)
    configure()
    import prefect  # noqa: F401 - sets up Prefect's log handlers, then:

    from thinair import redact

    redact.install()  # mask tokens and passwords in every log line
    if args.command == "serve":
        return _serve(args)
    from thinair import launch
    from thinair.flows.pipeline import pipeline_flow, regenerate_flow

    try:
        url = launch.prefect_api()  # the shared local server (its stage commands inherit it), unless one is configured
        stack = launch.api_url_everywhere(url) if url else contextlib.nullcontext()
        with stack:
            result = _run_pipeline(args, pipeline_flow, regenerate_flow)
    except ParamsError as err:
        print(f"thinair {args.command}: invalid parameters\n{err}", file=sys.stderr)
        return EXIT_PARAMS
    except Exception as err:  # noqa: BLE001 - a failed stage: DVC names it; keep the message, not the traceback
        print(f"thinair {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(result))
    return 0


def _run_pipeline(args, pipeline_flow, regenerate_flow) -> dict:
    """`thinair pipeline` (with its -S overrides) or `thinair regenerate`, once, here."""
    if args.command == "pipeline":
        import yaml

        overrides = {}
        for item in args.set:
            if "=" not in item:
                raise ParamsError(f"-S {item!r}: expected SECTION.KEY=VALUE")
            k, v = item.split("=", 1)
            overrides[k] = yaml.safe_load(v)
        return pipeline_flow(overrides=overrides, push=args.push, force=args.force, root=args.root)
    return regenerate_flow(push=not args.no_push, root=args.root)
