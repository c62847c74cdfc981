"""The `vis2ir` command and its subcommands. Argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import logging
import sys

from vis2ir.errors import Vis2IRError

log = logging.getLogger("vis2ir")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: $XFL_CONFIG, else the built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.semantic.num_heads=16")


def _cmd_demo(args: argparse.Namespace) -> None:
    from vis2ir.demo import run_demo

    run_demo(out_dir=args.out, config_path=args.config, overrides=args.overrides)


def _cmd_train(args: argparse.Namespace) -> None:
    from vis2ir.config import load_config
    from vis2ir.train import train

    train(load_config(args.config, args.overrides), resume=args.resume)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vis2ir", description="Visible-to-infrared generation on FLUX.1 Fill.")
    parser.add_argument("--debug", action="store_true", help="DEBUG logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the embedded demo on synthetic ThermalScenes (CPU, no download)")
    p.add_argument("--out", default="outputs/demo", help="report folder (default: outputs/demo)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train LoRA / the adapter (or a small model from scratch)")
    p.add_argument("--resume", metavar="DIR|latest", help="continue from a checkpoint folder, a run folder, or "
                   "'latest' (the newest checkpoint under train.output_dir)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="[%(levelname)s] %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except Vis2IRError as err:
        if args.debug:
            raise
        sys.stderr.write(f"vis2ir: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("vis2ir: interrupted\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
