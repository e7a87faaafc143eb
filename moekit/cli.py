"""The ``moekit`` command line: inspect, convert, verify, plan, upcycle, merge, demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .errors import MoekitError, printable
from .expert_parallel.ranges import EP_LAYOUTS, PLACEMENTS
from .layouts import LAYOUTS

EXIT_ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code (0 ok, 1 verify found differences, 2 bad input or
    a file-system error, 128+N after signal N: 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with _signals_as_interrupts():
            _download(args)
            return args.run(args)
    except MoekitError as err:
        print(f"moekit: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as err:
        signum = err.signum if isinstance(err, Interrupted) else signal.SIGINT
        print(_interrupted(err, signum), file=sys.stderr)
        return 128 + signum
    except OSError as err:
        where = f": {os.fsdecode(err.filename)}" if err.filename is not None else ""
        print(printable(f"moekit: error: {_after_writing(err)}{err.strerror or err}{where}"),
              file=sys.stderr)
        return EXIT_ERROR


def _after_writing(err: OSError) -> str:
    """How an error message starts: with the output it came after, if one was in place."""
    from .output import in_place

    written = in_place(err)
    return "" if written is None else f"wrote {written} in full and put it in place, then: "


def _interrupted(err: KeyboardInterrupt, signum: int) -> str:
    """What an interrupt left: nothing, or an output completed just before it came."""
    from .output import in_place

    by = f" by {signal.Signals(signum).name}" if signum != signal.SIGINT else ""
    written = in_place(err)
    if written is not None:
        return printable(f"moekit: interrupted{by} after {written} was written in full and "
                         "put in place")
    return f"moekit: interrupted{by}; nothing was left in place"


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (what ``timeout``, Slurm, ``docker stop`` and a closed terminal
    send), raised where the program is, so that it cleans up exactly as on Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_as_interrupts(signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGHUP)
                           ) -> Iterator[None]:
    """Turn ``signums`` into ``Interrupted`` while the block runs (in the main thread, the
    only one Python lets handle signals), then restore the previous handlers. A signal the
    caller ignores (``nohup``) stays ignored; after the first signal the others are
    ignored, so that a second one cannot cut the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in signums}
    handled = [s for s, handler in previous.items() if handler is not signal.SIG_IGN]

    def interrupt(signum: int, frame: object) -> None:
        for s in handled:
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    for s in handled:
        signal.signal(s, interrupt)
    try:
        yield
    finally:
        for s in handled:
            signal.signal(s, signal.SIG_DFL if previous[s] is None else previous[s])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit", description="Convert, shard and upcycle Mixture-of-Experts checkpoints.")
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    parser.set_defaults(download=False)
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in (_add_inspect, _add_convert, _add_verify, _add_plan, _add_upcycle, _add_merge,
                _add_demo):
        add(commands)
    return parser


def _add_output_options(sub: argparse.ArgumentParser) -> None:
    """The options of every command that writes a checkpoint (convert, upcycle, merge)."""
    sub.add_argument("--max-shard-size", default="5GB", help="largest output shard (default 5GB)")
    sub.add_argument("--dry-run", action="store_true",
                     help="validate and print the plan; write nothing")
    sub.add_argument("--overwrite", action="store_true",
                     help="replace an existing destination that holds a checkpoint (a folder "
                     "with anything else, or with the source's files, is refused)")
    sub.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")


def _add_format_option(sub: argparse.ArgumentParser, by_layout: bool = False) -> None:
    """``--format`` of the commands that write through the job pipeline's sinks
    (``moekit.conversion.sink_for``: convert, upcycle, merge); ``by_layout``: the default
    is the destination layout's (``Layout.default_format``)."""
    default = ("the --to layout's: " + ", ".join(
        f"{layout.default_format} for {name}" for name, layout in LAYOUTS.items()
        if layout.default_format != "safetensors") + ", else safetensors"
        ) if by_layout else "safetensors"
    sub.add_argument("--format", default=None if by_layout else "safetensors",
                     choices=("safetensors", "dcp", "megatron"),
                     help="output files: HF-sharded safetensors, one "
                     "torch.distributed.checkpoint folder (.metadata and .distcp files), or "
                     "a Megatron-Core torch_dist checkpoint (the megatron layout's); "
                     f"default: {default}")


HUB_ID = ("or a Hugging Face repo id ORG/NAME[@REVISION], read from the local Hub cache "
          "(see --download)")


def _add_download_option(sub: argparse.ArgumentParser, *checkpoints: str,
                         weights: bool = True,
                         hub_ids: Callable[[argparse.Namespace], list[str]] | None = None
                         ) -> None:
    """``--download`` for a command whose arguments ``checkpoints`` may be Hub repo ids
    (or, given ``hub_ids``, whose checkpoints ``hub_ids(args)`` names); without
    ``weights`` it fetches only their config.json."""
    fetched = ("its weight, index, config and sidecar files only" if weights else
               "its config.json only: the plan needs no weights, and a snapshot cached with "
               "its weights is planned from their headers")
    sub.add_argument("--download", action="store_true",
                     help=f"fetch a Hugging Face repo id missing from the local Hub cache "
                     f"({fetched}) before reading it; without it nothing is downloaded, and "
                     "HF_HUB_OFFLINE=1 forbids it")
    if hub_ids is None:
        def hub_ids(args: argparse.Namespace) -> list[str]:
            return [getattr(args, name) for name in checkpoints]

    sub.set_defaults(hub_ids=hub_ids, download_weights=weights)


def _download(args: argparse.Namespace) -> None:
    """With ``--download``, fetch the command's Hub repo ids into the Hub cache, where
    the command then finds them."""
    if args.download:
        from .hub import download

        for value in args.hub_ids(args):
            download(value, args.download_weights)
        if getattr(args, "config", None):  # (a local path is left as it is)
            from .checkpoint import GivenConfig
            from .hub import download_config

            download_config(GivenConfig.named(args.config))


def _command(commands, name: str, help: str, run: Callable[[argparse.Namespace], int]
             ) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help, description=help)
    sub.set_defaults(run=run)
    return sub


def _add_inspect(commands) -> None:
    sub = _command(commands, "inspect", "Show a checkpoint's family, layout, experts and sizes.",
                   _run_inspect)
    sub.add_argument("path", help=f"checkpoint folder or .safetensors file, {HUB_ID}")
    sub.add_argument("--from", dest="from_", choices=list(LAYOUTS), help="override layout detection")
    sub.add_argument("--json", action="store_true", help="print JSON")
    _add_config_option(sub)
    _add_download_option(sub, "path")


def _add_config_option(sub: argparse.ArgumentParser, writes: bool = False) -> None:
    """``--config``; for a command that ``writes`` a checkpoint, what travels with it."""
    copied = (" (written beside the output with a model folder's tokenizer, generation, "
              "chat-template, processor, remote-code, licence and use-policy files, where "
              "the checkpoint has none of theirs)" if writes else "")
    sub.add_argument("--config", help="the model's config.json, for a checkpoint that has "
                     "none (training checkpoints: torchtitan, Megatron-LM) or to read it by "
                     "instead of its own: a JSON file (a name ending in .json is a path), or "
                     f"a model folder or Hub id holding one{copied}; --download fetches a "
                     "Hub id's config.json and those files. Nothing is written into the "
                     "checkpoint")


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect

    info = inspect(args.path, args.from_, config=args.config)
    print(json.dumps(info.to_json(), indent=2) if args.json else info.render())
    return 0


def _add_convert(commands) -> None:
    sub = _command(commands, "convert", "Convert a checkpoint's experts to another layout.",
                   _run_convert)
    sub.add_argument("src", help=f"source checkpoint folder, {HUB_ID}")
    sub.add_argument("dst", help="destination folder (must not exist, unless --overwrite)")
    sub.add_argument("--to", required=True, choices=list(LAYOUTS),
                     help="destination layout: " + "; ".join(
                         f"{name}: {layout.description}" for name, layout in LAYOUTS.items()))
    sub.add_argument("--from", dest="from_", choices=list(LAYOUTS),
                     help="source layout (default: detected)")
    sub.add_argument("--dequantize", action="store_true",
                     help="write FP8 block-scaled and MXFP4 weights as bf16 (their scales "
                     "dropped); needed for --to nemo, which holds no scales")
    _add_config_option(sub, writes=True)
    _add_output_options(sub)
    _add_format_option(sub, by_layout=True)
    _add_download_option(sub, "src")


def _run_convert(args: argparse.Namespace) -> int:
    from .conversion import convert  # no torch: a dry run answers at once

    plan = convert(args.src, args.dst, args.to, from_=args.from_,
                   max_shard_size=args.max_shard_size, dry_run=args.dry_run,
                   overwrite=args.overwrite, dequantize=args.dequantize, format=args.format,
                   config=args.config)
    _report_plan(plan, plan.summary(), args)
    return 0


def _report_plan(plan, summary: str, args: argparse.Namespace, **extra: object) -> None:
    """Print what a convert/upcycle did, or with --dry-run what it would do."""
    from .plan import describe

    if args.dry_run and args.json:
        print(json.dumps({"family": plan.family, "from": plan.src_layout, "to": plan.dst_layout,
                          **extra, "total_bytes": plan.total_bytes, "tensors": [
                              {"name": t.name, "shape": list(t.shape), "dtype": t.dtype,
                               "recipe": describe(t.recipe)} for t in plan.tensors]}, indent=2))
        return
    if args.dry_run:
        print(summary)
        for t in plan.tensors:
            if not t.is_copy:
                print(printable(f"  {t.name} {list(t.shape)} {t.dtype} = {describe(t.recipe)}"))
        print("dry run: nothing written")
        return
    try:
        print(summary)
        print(printable(f"wrote {args.dst}"))
    except (KeyboardInterrupt, OSError) as err:  # a paused terminal, a full or closed stdout
        err.moekit_in_place = Path(args.dst)
        raise


def _add_verify(commands) -> None:
    sub = _command(commands, "verify",
                   "Check that two checkpoints hold bit-identical weights, whatever their layouts "
                   "(exit 0 if so, 1 otherwise).", _run_verify)
    sub.add_argument("a", help=f"checkpoint folder, {HUB_ID}")
    sub.add_argument("b", help="the other checkpoint, likewise")
    sub.add_argument("--json", action="store_true", help="print JSON")
    _add_config_option(sub)
    _add_download_option(sub, "a", "b")


def _run_verify(args: argparse.Namespace) -> int:
    from .verification import verify

    report = verify(args.a, args.b, config=args.config)
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
    return 0 if report.equal else 1


def _add_plan(commands) -> None:
    sub = _command(commands, "plan", "Show what each expert-parallel rank owns, reads and holds, "
                   "from headers or from a config.json alone.", _run_plan)
    sub.add_argument("path", help="checkpoint folder, a config.json (no weights needed), "
                     f"{HUB_ID}")
    sub.add_argument("--ep", type=int, required=True, help="expert-parallel group size")
    sub.add_argument("--layout", choices=EP_LAYOUTS,
                     help="grouped layout the ranks load (default: the first of "
                     f"{', '.join(EP_LAYOUTS)} that holds the checkpoint: transformers for "
                     "experts with FP8 scales or in MXFP4, which NeMo dequantises; the "
                     "output names it)")
    sub.add_argument("--dp", type=int, default=1,
                     help="data-parallel (FSDP) size of a (dp, ep) mesh of dp x ep ranks: "
                     "experts Shard(0) over ep, every other tensor Shard(0) over dp as FSDP2 "
                     "lays out its parameters (ceil(rows/dp) rows a rank), as load_sharded "
                     "loads it; each rank's held bytes, and the bytes load_sharded reads on "
                     "it (each byte once over the mesh, but those of a tensor built from "
                     "several, which each rank reads whole) (default 1)")
    sub.add_argument("--placement", default="chunk", choices=list(PLACEMENTS),
                     help="which experts each rank owns: chunk (default; torch.chunk and "
                     "DTensor Shard(0), ceil(E/n) a rank, what load_experts loads) or vllm "
                     "(vLLM's default expert placement: the first E mod n ranks get one more)")
    sub.add_argument("--json", action="store_true", help="print JSON")
    _add_config_option(sub)
    _add_download_option(sub, "path", weights=False)


def _run_plan(args: argparse.Namespace) -> int:
    from .expert_parallel.report import ep_report, render, to_json

    if args.ep < 1:
        raise MoekitError(f"--ep {args.ep}: the expert-parallel group size is a number of "
                          "ranks, at least 1")
    loads = ep_report(args.path, args.ep, args.layout, args.placement, args.dp,
                      config=args.config)
    print(json.dumps(to_json(loads), indent=2) if args.json
          else render(loads, chosen=args.layout is not None))
    return 0


def _add_upcycle(commands) -> None:
    from .upcycling.spec import METHODS, ROUTERS, SCALINGS
    from .upcycling.targets import TARGETS

    sub = _command(commands, "upcycle", "Turn a dense HF checkpoint (Llama, Mistral, Qwen2, "
                   "Qwen3) into an MoE checkpoint that transformers loads.", _run_upcycle)
    sub.add_argument("dense", help=f"dense checkpoint folder, {HUB_ID}")
    sub.add_argument("dst", help="destination folder (must not exist, unless --overwrite)")
    sub.add_argument("--experts", type=int, required=True, help="routed experts per layer")
    sub.add_argument("--top-k", type=int, required=True, help="experts per token")
    sub.add_argument("--method", default="copy", choices=METHODS,
                     help="copy: every expert the dense MLP; granular: G slices of it; drop: "
                     "copies with part of the neurons re-initialised (default copy)")
    sub.add_argument("--granularity", type=int,
                     help="G >= 2, slices of the dense MLP (granular only; experts and top-k "
                     "multiples of G)")
    sub.add_argument("--shared-expert", action="store_true",
                     help="also make a shared expert from the dense MLP")
    sub.add_argument("--drop-ratio", type=float,
                     help="fraction of neurons re-initialised per expert, in (0, 1] (drop only; "
                     "default 0.5)")
    sub.add_argument("--router", choices=ROUTERS,
                     help="router initialisation (default virtual-group for granular, else random)")
    sub.add_argument("--router-std", type=float,
                     help="std of random router rows, > 0 (not with --router zero; default: "
                     "config initializer_range)")
    sub.add_argument("--scaling", default="exact", choices=SCALINGS,
                     help="exact: preserve the dense function; megatron: Megatron-Core's "
                     "cube-root scaling (default exact)")
    sub.add_argument("--target", default="auto", choices=["auto", *TARGETS],
                     help="MoE family to write (default: the dense family's sibling)")
    sub.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    sub.add_argument("--to", default="hf", choices=list(LAYOUTS),
                     help="layout to write the MoE in (default hf; torchtitan: the whole model "
                     "under torchtitan's names, as a torch.distributed.checkpoint folder)")
    _add_output_options(sub)
    _add_format_option(sub, by_layout=True)
    _add_download_option(sub, "dense")


def _run_upcycle(args: argparse.Namespace) -> int:
    from .upcycling import UpcycleSpec, upcycle

    spec = UpcycleSpec(experts=args.experts, top_k=args.top_k, method=args.method,
                       granularity=1 if args.granularity is None else args.granularity,
                       shared_expert=args.shared_expert, drop_ratio=args.drop_ratio,
                       router=args.router, router_std=args.router_std, target=args.target,
                       seed=args.seed, scaling=args.scaling)
    result = upcycle(args.dense, args.dst, spec, max_shard_size=args.max_shard_size,
                     dry_run=args.dry_run, overwrite=args.overwrite, format=args.format,
                     to=args.to)
    _report_plan(result.plan, result.summary(), args, config=result.config)
    return 0


def _add_merge(commands) -> None:
    sub = _command(commands, "merge", "Merge dense fine-tunes of one base model into an MoE "
                   "checkpoint, from a mergekit-moe YAML configuration.", _run_merge)
    from .merging.config import EXPERT_FIELDS, FIELDS

    sub.add_argument("config", help=f"mergekit-moe YAML: {', '.join(FIELDS)}; each expert "
                     f"and shared expert: {', '.join(EXPERT_FIELDS)}. moekit's own settings, "
                     "under a 'moekit:' mapping (which mergekit-moe ignores): at the top "
                     "level granularity G (split each expert's MLP into G routed experts, "
                     "top-k times G, each source's router row repeated G times), in an expert "
                     "drop_ratio R (Drop-Upcycling: re-initialise a fraction R of its neurons, "
                     "as upcycle --method drop does; not with granularity)")
    sub.add_argument("dst", help="destination folder (must not exist, unless --overwrite)")
    sub.add_argument("--seed", type=int, default=0,
                     help="seed of gate_mode random/uniform_random, as mergekit-moe's "
                     "--random-seed, and of drop_ratio's draws, as upcycle's --seed "
                     "(default 0)")
    sub.add_argument("--device", default="cpu",
                     help="where gate_mode hidden runs the base model (default cpu)")
    _add_output_options(sub)
    _add_format_option(sub)
    _add_download_option(sub, hub_ids=_merge_models)


def _merge_models(args: argparse.Namespace) -> list[str]:
    """The base model and the expert models a merge configuration names, each once."""
    from .merging import load_merge_config

    merge = load_merge_config(args.config)
    return list(dict.fromkeys([merge.base_model,
                               *(s.source_model for s in merge.sources.values())]))


def _run_merge(args: argparse.Namespace) -> int:
    from .merging import merge

    result = merge(args.config, args.dst, seed=args.seed, max_shard_size=args.max_shard_size,
                   dry_run=args.dry_run, overwrite=args.overwrite, device=args.device,
                   format=args.format)
    _report_plan(result.plan, result.summary(), args, config=result.config,
                 merge=result.to_json())
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
