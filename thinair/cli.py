"""`thinair <stage>`: run one stage's Prefect flow (this is what each dvc.yaml stage calls).

Parameters are validated before anything else happens (no server start, no file touched): a bad
value exits with status 2 and a message naming the key. Known failures (missing inputs, unusable
dataset or generator, non-finite loss) exit with status 1 and a one-paragraph explanation.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import sys
import time

from thinair import progress
from thinair.config import STAGES, ParamsError, load_params

EXIT_PARAMS, EXIT_FAILED = 2, 1


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="thinair", description="Diffusion Inversion dataset synthesis pipeline.")
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one parameter for this run (YAML value), repeatable")
    ap.add_argument("--root", default=".", help="project root holding data/ (default: .)")
    sub = ap.add_subparsers(dest="command", required=True)
    for s in STAGES:
        sub.add_parser(s, help=f"run the `{s}` stage (flows/{s}.py)")
    sub.add_parser("check", help="validate the params file and exit")
    sub.add_parser("params", help="print every parameter with its default and meaning (markdown)")
    pre = sub.add_parser("preset", help="the paper's settings for a dataset, as a `dvc exp run` command")
    pre.add_argument("name", help="cifar10, cifar100, stl10, imagenette, eurosat, pathmnist, dermamnist, "
                     "bloodmnist, retinamnist; paper-di (Diffusion Inversion exactly as the paper, current dataset: "
                     "every beyond-paper option off); or a steering method on the current dataset: method-inversion, "
                     "method-class-encoder, method-class-encoder-lora, method-class-tokens; or search-best (the "
                     "`search` stage's best trial)")
    pre.add_argument("--run", action="store_true", help="run the experiment now (dvc exp run)")
    pipe = sub.add_parser("pipeline", help="the whole DAG through DVC as one Prefect flow: write -S overrides into "
                          "params.yaml, reproduce exactly the stale stages (dvc.lock updated)")
    pipe.add_argument("-S", "--set", action="append", default=argparse.SUPPRESS, metavar="SECTION.KEY=VALUE",
                      help="write this parameter into params.yaml first (validated), repeatable")
    pipe.add_argument("--push", action="store_true", help="dvc push the new versions afterwards")
    pipe.add_argument("--force", action="store_true", help="re-run every stage but pretrain (dvc repro -f): their "
                      "finished tasks are Prefect cache hits")
    regen = sub.add_parser("regenerate", help="what the scheduled deployment runs: reproduce the stale stages (none: "
                           "done in seconds), then dvc push")
    regen.add_argument("--no-push", action="store_true", help="do not dvc push afterwards")
    srv = sub.add_parser("server", help="start the Prefect server and UI (prefect server start), on 127.0.0.1 "
                         "unless --host says otherwise")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; to expose it set "
                     "PREFECT_SERVER_API_AUTH_STRING, see README)")
    srv.add_argument("--port", type=int, default=4200)
    serve = sub.add_parser("serve", help="serve the `pipeline` deployment (run it from the UI with its params) and "
                           "the scheduled `regenerate` deployment; needs PREFECT_API_URL (thinair server)")
    serve.add_argument("--cron", default=None, help="regeneration schedule, cron syntax (default: every --interval)")
    serve.add_argument("--interval", type=int, default=3600, help="regeneration every N seconds (default 3600)")
    serve.add_argument("--no-push", action="store_true", help="scheduled runs do not dvc push")
    _export_arguments(sub)
    return ap


def _export_arguments(sub) -> None:
    """`thinair export`'s arguments; the export itself is thinair/formats.py (imported only when it runs)."""
    ex = sub.add_parser("export", help="write data/sample (optionally with the real train split) as an image "
                        "folder, a Hugging Face dataset or WebDataset shards, with a dataset card (README.md); "
                        "without OUT, run the `export` stage (data/export from params.yaml's export section)")
    ex.add_argument("out", nargs="?", default=None, help="output folder (must not exist, or be empty); without it, "
                    "run the `export` stage as dvc repro does: its options are params (-S export.format=hf ...)")
    ex.add_argument("--format", choices=("imagefolder", "hf", "webdataset"), default="imagefolder",
                    help="default: imagefolder (thinair/formats.py describes each layout)")
    ex.add_argument("--where", action="append", default=[], metavar="COLUMN<OP>VALUE",
                    help="keep rows whose provenance column meets this (op: = != < <= > >=), repeatable (all must "
                    "hold), e.g. checkpoint=-1, guidance>=2, method=inversion, clip_score>25; a condition on a column "
                    "a row has no value in (real images: guidance, seed ...) keeps it")
    ex.add_argument("--real", action="store_true", help="add the real train split (provenance method 'real')")
    ex.add_argument("--per-class", type=int, default=None, metavar="N", help="at most N images per class (seeded)")
    ex.add_argument("--limit", type=int, default=None, metavar="N", help="at most N images in all (seeded)")
    ex.add_argument("--seed", type=int, default=0, help="seed of --limit / --per-class (default 0)")
    ex.add_argument("--shard-size", type=int, default=10000, metavar="N",
                    help="images per parquet file (hf) or tar shard (webdataset); default 10000")
    ex.add_argument("--push-to-hub", default=None, metavar="REPO", help="hf only: then upload the card and parquet "
                    "files to this Hugging Face dataset repo (needs network and a token; never done otherwise)")


SKIPPABLE = ("classenc", "search", "export")  # stages that may have nothing to do (thinair/skips.py)
# Stages whose outputs end in `metrics`: each checks the metric features are available before it starts.
EVALUATED_BY_METRICS = ("check", "ingest", "encode", "invert", "sample", "metrics")


def _known_errors() -> tuple[type[BaseException], ...]:
    """What the CLI explains in one paragraph instead of a traceback: every thinair error (thinair/errors.py), bad
    values, and I/O failures (a full disk)."""
    from thinair.errors import ThinairError

    return (ThinairError, ValueError, OSError)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "params":
        from thinair.config import params_table

        print(params_table())
        return 0
    if args.command == "preset":
        return _preset(args)
    if args.command in ("server", "serve", "pipeline", "regenerate"):
        from thinair import serving

        return serving.main(args)
    try:
        params = load_params(args.params, args.set)
        progress.mode()  # THINAIR_PROGRESS, checked before any work like the params
    except ParamsError as err:
        print(f"thinair: invalid parameters\n{err}", file=sys.stderr)
        return EXIT_PARAMS
    except ValueError as err:
        print(f"thinair: {err}", file=sys.stderr)
        return EXIT_PARAMS
    if args.command in EVALUATED_BY_METRICS and params.metrics.features != "domain":
        from thinair.features import FeaturesUnavailable, check_available

        try:  # fail before any work: a missing Inception/CLIP model would otherwise stop the run at `metrics`
            check_available(params.metrics.features, params.metrics.clip_model)
        except FeaturesUnavailable as err:
            print(f"thinair {args.command}: metrics.features={params.metrics.features!r} is unavailable: {err}",
                  file=sys.stderr)
            return EXIT_FAILED
    if args.command == "check":
        print(f"{args.params}: OK")
        return 0
    if args.command == "export" and args.out is not None:
        return _export(args, params)
    if args.command == "export" and _export_flags(args):
        print(f"thinair export: {', '.join(_export_flags(args))} need an OUT folder; the `export` stage (no OUT) takes "
              "its options from params.yaml's export section (e.g. -S export.where='[checkpoint=-1]')", file=sys.stderr)
        return EXIT_PARAMS
    from thinair import launch, redact
    from thinair.orchestration import configure
    from thinair.workspace import exclusive

    if args.command in SKIPPABLE:
        from thinair import skips

        if skips.skipped(args.command, params) is not None:
            return _skip(args, params)
    configure()
    logging.basicConfig(level=os.environ.get("THINAIR_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    redact.install()  # mask tokens and passwords in every log line (third-party DEBUG logs print auth headers)
    try:
        parent = os.environ.get("THINAIR_PIPELINE_RUN")
        with contextlib.ExitStack() as stack:
            stack.enter_context(exclusive(args.root, args.command))  # one run per workspace at a time
            runner = launch.task_runner_for(args.command, params, args.root)
            api_url = launch.prefect_api(params)  # the shared local server, unless one is configured
            if api_url:
                stack.enter_context(launch.api_url_everywhere(api_url))
            module = importlib.import_module(f"thinair.flows.{args.command}")
            redact.install()  # again, now that Prefect's console and API handlers exist
            t0 = time.time()
            flow = getattr(module, f"{args.command}_flow").with_options(task_runner=runner)
            if parent:  # run by the `pipeline` flow: tag this stage's run so the UI shows which pipeline run made it
                from prefect import tags

                stack.enter_context(tags("thinair-pipeline", f"pipeline-{parent[:8]}"))
            result = flow(params=params, root=args.root)
    except _known_errors() as err:
        hint = ""
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            hint = ("\nThe disk is full: free space (or move the project to a larger disk) and run the same command "
                    "again; finished chunks are kept and the partial file was removed.")
        print(f"thinair {args.command}: failed: {err}{hint}", file=sys.stderr)
        return EXIT_FAILED
    print(f"thinair {args.command}: done in {time.time() - t0:.1f}s")
    if isinstance(result, dict):
        brief = {k: v for k, v in result.items() if not isinstance(v, (list, dict)) or len(str(v)) < 300}
        print(brief)
    return 0


def _export_flags(args) -> list[str]:
    """The `thinair export` options given on the command line (they apply to an OUT folder, not to the stage)."""
    defaults = vars(_parser().parse_args(["export"]))
    return [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
            if k not in ("params", "set", "root", "command", "out") and v != defaults[k]]


def _export(args, params) -> int:
    """`thinair export`: no Prefect, no lock (it only reads data/ and writes its own folder, atomically)."""
    from thinair.formats import run

    try:
        summary = run(args, params)
    except _known_errors() as err:
        print(f"thinair export: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"thinair export: wrote {summary['images']} images ({summary['synthetic']} synthetic, {summary['real']} "
          f"real) as {summary['format']} to {summary['out']} (card: {summary['out']}/README.md)")
    return 0


def _skip(args, params) -> int:
    """A stage with nothing to do (thinair/skips.py): write its manifest, without Prefect or a model."""
    from thinair import skips
    from thinair.workspace import exclusive

    t0 = time.time()
    try:
        with exclusive(args.root, args.command):
            manifest = skips.write_if_skipped(args.command, params, args.root)
    except _known_errors() as err:
        print(f"thinair {args.command}: failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    print(f"thinair {args.command}: done in {time.time() - t0:.1f}s (nothing to do; Prefect not started)")
    print(manifest)
    return 0


def _preset(args) -> int:
    """Print (or run) `dvc exp run -S ...` for a preset, after validating the resulting params."""
    import shlex
    import subprocess

    from thinair.presets import set_args

    try:
        sets = set_args(args.name, args.root, args.params)
        overrides = [sets[i + 1] for i in range(0, len(sets), 2)]
        load_params(args.params, overrides)  # a preset must validate like any params file
    except (ValueError, ParamsError) as err:
        print(f"thinair preset: {err}", file=sys.stderr)
        return EXIT_PARAMS
    name = args.name if args.name.startswith(("method-", "search-", "classenc-")) else f"paper-{args.name}"
    cmd = ["dvc", "exp", "run", "-n", name] + sets
    # one `-S key=value` per line (a shell line continuation each), so a reader can check every value
    print(" \\\n  ".join([shlex.join(cmd[:5])] + [shlex.join(sets[i:i + 2]) for i in range(0, len(sets), 2)]))
    return subprocess.call(cmd) if args.run else 0


if __name__ == "__main__":
    sys.exit(main())
