"""The ``moekit`` command line: inspect, convert, verify, demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from . import __version__
from .errors import MoekitError
from .layouts import LAYOUTS

EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 verify found differences, 2 bad input)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except MoekitError as err:
        print(f"moekit: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("moekit: interrupted; nothing was left in place", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Convert, shard and upcycle Mixture-of-Experts checkpoints.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in (_add_inspect, _add_convert, _add_verify, _add_plan, _add_demo):
        add(commands)
    return parser


def _command(commands, name: str, help: str, run: Callable[[argparse.Namespace], int]
             ) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help, description=help)
    sub.set_defaults(run=run)
    return sub


def _add_inspect(commands) -> None:
    sub = _command(commands, "inspect", "Show a checkpoint's family, layout, experts and sizes.",
                   _run_inspect)
    sub.add_argument("path", help="checkpoint folder or .safetensors file")
    sub.add_argument("--from", dest="from_", choices=list(LAYOUTS), help="override layout detection")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    info = inspect(args.path, args.from_)
    print(json.dumps(info.to_json(), indent=2) if args.json else info.render())
    return 0


def _add_convert(commands) -> None:
    sub = _command(commands, "convert", "Convert a checkpoint's experts to another layout.",
                   _run_convert)
    sub.add_argument("src", help="source checkpoint folder")
    sub.add_argument("dst", help="destination folder (must not exist, unless --overwrite)")
    sub.add_argument("--to", required=True, choices=list(LAYOUTS), help="destination layout")
    sub.add_argument("--from", dest="from_", choices=list(LAYOUTS),
                     help="source layout (default: detected)")
    sub.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    sub.add_argument("--dry-run", action="store_true",
                     help="validate and print the plan; write nothing")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    sub.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert
    from .plan import describe

    plan = convert(args.src, args.dst, args.to, from_=args.from_,
                   max_shard_size=args.max_shard_size, dry_run=args.dry_run,
                   overwrite=args.overwrite)
    if args.dry_run and args.json:
        print(json.dumps({"family": plan.family, "from": plan.src_layout, "to": plan.dst_layout,
                          "total_bytes": plan.total_bytes, "tensors": [
                              {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                               "recipe": describe(t.recipe)} for t in plan.tensors]}, indent=2))
    elif args.dry_run:
        print(plan.summary())
        for t in plan.tensors:
            if not t.is_copy:
                print(f"  {t.name} {list(t.shape)} {t.dtype} = {describe(t.recipe)}")
        print("dry run: nothing written")
    else:
        print(plan.summary())
        print(f"wrote {args.dst}")
    return 0


def _add_verify(commands) -> None:
    sub = _command(commands, "verify",
                   "Check that two checkpoints hold bit-identical weights, whatever their layouts "
                   "(exit 0 if so, 1 otherwise).", _run_verify)
    sub.add_argument("a")
    sub.add_argument("b")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _run_verify(args: argparse.Namespace) -> int:
    from .verification import verify

    report = verify(args.a, args.b)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
    return 0 if report.equal else 1


def _add_plan(commands) -> None:
    sub = _command(commands, "plan", "Show what each expert-parallel rank owns, reads and holds, "
                   "from headers or from a config.json alone.", _run_plan)
    sub.add_argument("path", help="checkpoint folder, or a config.json (no weights needed)")
    sub.add_argument("--ep", type=int, required=True, help="expert-parallel group size")
    sub.add_argument("--layout", default="nemo", choices=[l for l in LAYOUTS if l != "hf"],
                     help="grouped layout the ranks load (default nemo)")
    sub.add_argument("--json", action="store_true", help="print JSON")


def _run_plan(args: argparse.Namespace) -> int:
    from .expert_parallel.report import ep_report, render, to_json

    loads = ep_report(args.path, args.ep, args.layout)
    print(json.dumps(to_json(loads), indent=2) if args.json else render(loads))
    return 0


def _add_demo(commands) -> None:
    sub = _command(commands, "demo", "Build tiny sample models with transformers and run moekit's "
                   "main jobs on them (no downloads).", _run_demo)
    sub.add_argument("--out", help="keep the sample checkpoints in this folder "
                     "(default: a temporary folder, removed afterwards)")


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.out)


if __name__ == "__main__":
    sys.exit(main())
