"""The `vis2ir` command and its subcommands. Argument parsing and dispatch only."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings

from vis2ir.errors import Vis2IRError
from vis2ir.signals import Stopped

log = logging.getLogger("vis2ir")

# A `key.path=value` override; it may stand anywhere among a command's arguments (`main` collects them).
SYNTH_SIZE = 256  # `data synth`'s default scene side

OVERRIDE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*=")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: $XFL_CONFIG, else the built-in defaults)")
    p.set_defaults(overrides=[])
    p.epilog = ("key=value: dotted overrides of the settings, e.g. model.semantic.num_heads=16; they may stand "
                "anywhere among the arguments")


def _cmd_demo(args: argparse.Namespace) -> None:
    from vis2ir.demo import run_demo

    path = run_demo(out_dir=args.out, config_path=args.config, overrides=args.overrides, checkpoint=args.checkpoint)
    sys.stdout.write(f"{path}\n")


def _cmd_app(args: argparse.Namespace) -> None:
    try:
        import gradio  # noqa: F401 - the optional `app` extra
    except ImportError:
        raise Vis2IRError('vis2ir app needs gradio, which is not installed: pip install "vis2ir[app]"') from None
    from vis2ir.app import serve

    serve(args.checkpoint, host=args.host, port=args.port, share=args.share, device=args.device,
          segment_model=args.segment_model, keep_minutes=args.keep_minutes, max_upload_mib=args.max_upload_mib)


def _cmd_train(args: argparse.Namespace) -> None:
    from vis2ir.config import load_config

    cfg = None if args.resume else load_config(args.config, args.overrides)  # before torch and Lightning load
    from vis2ir.train import resume_config, train

    # A resume starts from the run's saved settings, not the defaults or the config file's.
    train(cfg or resume_config(args.resume, args.config, args.overrides), resume=args.resume)


def _cmd_config_show(args: argparse.Namespace) -> None:
    from vis2ir.config import describe_settings, load_config

    sys.stdout.write(describe_settings(load_config(args.config, args.overrides)))


def _cmd_data_synth(args: argparse.Namespace) -> None:
    from vis2ir.data import write_thermalscenes

    from vis2ir.data.synth import parse_shapes

    if (args.width is None) != (args.height is None):
        raise Vis2IRError("data synth: give --width and --height together (or --shapes WxH,...)")
    if args.shapes and args.width is not None:
        raise Vis2IRError("data synth: give either --width/--height or --shapes, not both")
    if args.size is not None and (args.shapes or args.width is not None):
        raise Vis2IRError("data synth: --size makes square scenes; give it or --width/--height or --shapes, "
                          "not both")
    shapes = parse_shapes(args.shapes) if args.shapes else \
        parse_shapes(f"{args.width}x{args.height}", "--width/--height") if args.width is not None else None
    write_thermalscenes(args.out, count=args.count, size=args.size or SYNTH_SIZE, seed=args.seed, fmt=args.format,
                        shapes=shapes)


def _cmd_data_inspect(args: argparse.Namespace) -> None:
    import dataclasses

    from vis2ir.config import load_config

    cfg = load_config(args.config, args.overrides)
    from vis2ir.data import inspect_source

    data = dataclasses.replace(cfg.data, source=args.source)
    chosen = args.config or os.environ.get("XFL_CONFIG") or any(o.startswith("model.semantic.mode=")
                                                                for o in args.overrides)
    report = inspect_source(data, out=args.out or inspect_sheet_path(args.source), count=args.count,
                            mode=cfg.model.semantic.mode if chosen else "any")
    if report["problems"]:  # after the report and the contact sheet are written
        n = len(report["problems"])
        raise Vis2IRError(f"{args.source}: {n} problem{'s' if n != 1 else ''} found (listed above; contact sheet: "
                          f"{report['sheet']})")


def inspect_sheet_path(source: str) -> str:
    """`data inspect`'s contact sheet without --out: outputs/inspect/<the source's name>.png."""
    name = re.sub(r"[^\w.-]+", "_", source.rstrip("/\\").rsplit("/", 1)[-1]).strip("._") or "source"
    return f"outputs/inspect/{name}.png"


def _cmd_data_cache(args: argparse.Namespace) -> None:
    from vis2ir.config import load_config

    cfg = load_config(args.config, args.overrides)
    from vis2ir.latent_cache import build_latent_cache

    out = build_latent_cache(cfg, args.out, args.split, args.batch_size)
    if args.split == "train":
        sys.stdout.write(f"{out}\n  train with: data.latent_cache={out}\n")
    else:  # training reads the train split only: say so rather than "train with"
        sys.stdout.write(f"{out}\n  a cache of the {args.split} split, not the training split: training refuses it; "
                         f"for training, `vis2ir data cache --split train --out DIR`\n")


def _cmd_data_convert(args: argparse.Namespace) -> None:
    import dataclasses

    from vis2ir.config import load_config

    data = dataclasses.replace(load_config(args.config, args.overrides).data, source=args.source)
    from vis2ir.data.convert import convert_source

    sys.stdout.write(f"{convert_source(data, args.out, args.format)}\n")


def _generate_kwargs(args: argparse.Namespace) -> dict:
    keys = ("config", "checkpoint", "overrides", "semantic", "seed", "steps", "guidance", "batch_size",
            "adapter_scale", "overwrite", "offload", "device", "size", "segment_model", "recursive", "boxes")
    return {k: getattr(args, k) for k in keys} | {"points": args.point or (), "box_classes": args.box_classes or ()}


def _cmd_generate(args: argparse.Namespace) -> None:
    from vis2ir.generate import run_generate

    run_generate(args.input, args.out, bit_depth=args.bit_depth, palette=args.palette, compare=args.compare,
                 save_attention=args.save_attention, truth=args.truth, **_generate_kwargs(args))


def _cmd_visualize(args: argparse.Namespace) -> None:
    from vis2ir.generate import run_generate

    run_generate(args.input, args.out, write_images=False, **_generate_kwargs(args))


def _cmd_translate(args: argparse.Namespace) -> None:
    from vis2ir.translate.run import run_translate

    keys = ("config", "checkpoint", "overrides", "layout", "semantic", "boxes", "segment_model", "bit_depth", "palette",
            "seed", "steps", "guidance", "size", "batch_size", "workers", "device", "finalize")
    summary = run_translate(args.source, args.out, image_format=args.format, box_classes=args.box_classes or (),
                            **{k: getattr(args, k) for k in keys})
    if summary.card is not None:
        sys.stdout.write(f"{summary.card}\n")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from vis2ir.evaluate.run import evaluate_checkpoint, evaluate_folders

    if args.checkpoint:
        evaluate_checkpoint(args.checkpoint, config=args.config, overrides=args.overrides, split=args.split,
                            limit=args.limit, out=args.out, device=args.device)
    elif args.pred and args.truth:
        evaluate_folders(args.pred, args.truth, args.semantic, out=args.out, config=args.config,
                         overrides=args.overrides, device=args.device, recursive=args.recursive,
                         pred_values=args.pred_values)
    else:
        raise Vis2IRError("vis2ir evaluate: pass --pred DIR and --truth DIR, or --checkpoint DIR")


def _cmd_ablate(args: argparse.Namespace) -> None:
    from vis2ir.evaluate.ablate import run_ablation

    path = run_ablation(args.config, args.grid or [], seeds=args.seeds, out=args.out, overrides=args.overrides,
                        shard=args.shard, collect=args.collect, device=args.device, plan=args.plan)
    sys.stdout.write(f"{path}\n")


def _cmd_segment(args: argparse.Namespace) -> None:
    from vis2ir.segment import run_segment

    run_segment(args.input, args.out, model=args.model, batch_size=args.batch_size, device=args.device,
                overwrite=args.overwrite, threshold=args.threshold, recursive=args.recursive)


def _size(text: str) -> int | str:
    if text in ("auto", "native"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels, 'auto' or 'native', got {text!r}") from None


def _add_segment_model_arg(p: argparse.ArgumentParser, use: str) -> None:
    p.add_argument("--segment-model", metavar="ID|PATH",
                   help=f"panoptic segmenter (Hub id or local folder) {use} (default: that of vis2ir segment)")


def _add_generate_args(p: argparse.ArgumentParser) -> None:
    _add_config_args(p)
    p.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--input", required=True, help="a visible image, or a folder of them")
    p.add_argument("--recursive", action="store_true", help="also the images in the sub-folders of --input "
                   "(e.g. split folders); outputs and --semantic maps mirror the sub-folders")
    p.add_argument("--semantic", help="semantic map(s): a file, a folder of maps named like the inputs, or "
                   "'auto' (made by a panoptic segmenter, cached in semantic_auto/ beside the inputs)")
    _add_segment_model_arg(p, "for --semantic auto")
    p.add_argument("--boxes", help="semantic maps drawn from detection boxes: a folder of YOLO txt (+ classes.txt), "
                   "Pascal VOC xml or KAIST txt files named like the inputs, or one COCO json file")
    p.add_argument("--box-classes", action="append", metavar="NAME=CLASS",
                   help="map a box category to a palette class or to 'ignore' (repeatable; default: by name)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, help="seed of every image's noise (default: sample.seed)")
    p.add_argument("--steps", type=int, help="denoising steps (default: sample.steps)")
    p.add_argument("--guidance", type=float, help="guidance (default: sample.guidance)")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default: 1)")
    p.add_argument("--adapter-scale", type=float,
                   help="multiplies the adapter's effect (1: as trained, 0: off; default: sample.adapter_scale)")
    p.add_argument("--size", type=_size, help="the longer side the model generates at, then scaled back to each "
                   "input's size: pixels, 'native' (or 0: the input's own size) or 'auto' (a checkpoint's training "
                   "panel size, data.size; default: sample.size, auto)")
    p.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    p.add_argument("--point", action="append", metavar="X,Y",
                   help="query point in input pixels for attention maps (repeatable; default: the centre)")
    p.add_argument("--offload", choices=("none", "model", "sequential"), default="none",
                   help="CPU offload of the weights (default: none)")
    p.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda:$LOCAL_RANK if available)")


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the embedded demo on synthetic ThermalScenes (CPU, no download)")
    p.add_argument("--out", default="outputs/demo", help="report folder (default: outputs/demo)")
    p.add_argument("--checkpoint", help="a checkpoint to demonstrate instead of the shipped one")
    _add_config_args(p)
    p.set_defaults(func=_cmd_demo)


def _add_app(sub: argparse._SubParsersAction) -> None:
    from vis2ir.config import APP_KEEP_MINUTES, APP_MAX_UPLOAD_MIB

    p = sub.add_parser("app", help="a web page (Gradio) that generates infrared from uploaded photos; needs "
                       'pip install "vis2ir[app]"')
    p.add_argument("--checkpoint", help="checkpoint or run folder to serve (default: the two shipped demo models)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0: every "
                   "interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--share", action="store_true", help="also a temporary public link through Gradio's share "
                   "servers (default: off)")
    p.add_argument("--device", help="e.g. cuda:0 or cpu (default: the CPU for the shipped models, else cuda if "
                   "available)")
    _add_segment_model_arg(p, "(weights already on this machine) that makes the map of a photo uploaded without one")
    p.add_argument("--keep-minutes", type=float, default=APP_KEEP_MINUTES, metavar="M", help="delete results and "
                   "uploads this many minutes after they are made, so a long-running page does not fill the disk "
                   f"(default: {APP_KEEP_MINUTES})")
    p.add_argument("--max-upload-mib", type=float, default=APP_MAX_UPLOAD_MIB, metavar="M", help="refuse a "
                   f"photo or map larger than this many MiB, before it is stored (default: {APP_MAX_UPLOAD_MIB})")
    p.set_defaults(func=_cmd_app)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train LoRA / the adapter (or a small model from scratch)")
    p.add_argument("--resume", metavar="DIR|latest", help="continue from a checkpoint folder, a run folder, or "
                   "'latest' (the newest checkpoint under train.output_dir)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="settings: every one with its value and meaning")
    q = p.add_subparsers(dest="config_command", required=True).add_parser(
        "show", help="print every setting (a config file's, with overrides) with its meaning, as commented YAML")
    _add_config_args(q)
    q.set_defaults(func=_cmd_config_show)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="data tools: synthetic ThermalScenes, inspecting a source, latent cache")
    data = p.add_subparsers(dest="data_command", required=True)
    for add in (_add_data_synth, _add_data_inspect, _add_data_convert, _add_data_cache):
        add(data)


def _add_data_synth(data: argparse._SubParsersAction) -> None:
    q = data.add_parser("synth", help="write ThermalScenes (visible/infrared/semantic) to a folder or parquet")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--count", type=int, default=1000, help="number of scenes (default: 1000)")
    q.add_argument("--size", type=int, help=f"square scenes of this side in pixels (default: {SYNTH_SIZE}, "
                   "unless --width/--height or --shapes)")
    q.add_argument("--width", type=int, help="scene width in pixels, with --height (instead of a --size square)")
    q.add_argument("--height", type=int, help="scene height in pixels, with --width")
    q.add_argument("--shapes", help="a mix of scene shapes, WIDTHxHEIGHT,... taken in turn (e.g. 640x512,512x640)")
    q.add_argument("--seed", type=int, default=0, help="scene set seed (default: 0)")
    q.add_argument("--format", choices=("folder", "parquet"), default="folder",
                   help="visible/ infrared/ semantic/ PNGs, or one parquet file (default: folder)")
    q.set_defaults(func=_cmd_data_synth)


def _add_data_inspect(data: argparse._SubParsersAction) -> None:
    q = data.add_parser("inspect", help="counts per split, sizes, problems, and a contact sheet PNG")
    q.add_argument("source", help="a data folder, parquet file(s), a datasets folder or Hub id, or 'thermalscenes'")
    q.add_argument("--out", help="the contact sheet of triptychs, a PNG (default: outputs/inspect/<source name>.png)")
    q.add_argument("--count", type=int, default=8, help="triptychs on the contact sheet (default: 8)")
    _add_config_args(q)
    q.set_defaults(func=_cmd_data_inspect)


def _add_data_convert(data: argparse._SubParsersAction) -> None:
    q = data.add_parser("convert", help="a source (folder layout or table) -> paired folders or parquet, same "
                        "samples and splits")
    q.add_argument("source", help="a data folder, parquet file(s), or a datasets folder or Hub id")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--format", choices=("folder", "parquet"), default="folder",
                   help="visible/ infrared/ semantic/ PNGs + split lists, or <split>.parquet (default: folder)")
    _add_config_args(q)
    q.set_defaults(func=_cmd_data_convert)


def _add_data_cache(data: argparse._SubParsersAction) -> None:
    q = data.add_parser("cache", help="encode a split's latents once, for training with data.latent_cache=DIR")
    q.add_argument("--out", required=True, help="cache folder")
    q.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="split (default: train; training reads a train cache only)")
    q.add_argument("--batch-size", type=int, default=16, help="images per codec call (default: 16)")
    _add_config_args(q)
    q.set_defaults(func=_cmd_data_cache)


def _add_segment(sub: argparse._SubParsersAction) -> None:
    from vis2ir.config import DEFAULT_SEGMENTER

    p = sub.add_parser("segment", help="visible images (file or folder) -> panoptic semantic maps and a legend")
    p.add_argument("--input", required=True, help="a visible image, or a folder of them")
    p.add_argument("--recursive", action="store_true", help="also the images in the sub-folders of --input "
                   "(e.g. visible/train, visible/test); the maps mirror the sub-folders")
    p.add_argument("--out", required=True, help="output folder: <name>.png, segments/, legend.json, legend.png")
    p.add_argument("--model", default=DEFAULT_SEGMENTER, metavar="ID|PATH",
                   help=f"transformers panoptic model (Mask2Former, OneFormer): Hub id or local folder "
                   f"(default: {DEFAULT_SEGMENTER})")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default: 4)")
    p.add_argument("--threshold", type=float, default=0.5, help="minimum segment score (default: 0.5)")
    p.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda:$LOCAL_RANK if available)")
    p.add_argument("--overwrite", action="store_true", help="redo maps that already exist")
    p.set_defaults(func=_cmd_segment)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="visible images (file or folder) -> infrared PNGs")
    _add_generate_args(p)
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="grey PNG bit depth (default: 8)")
    p.add_argument("--palette", choices=("white-hot", "black-hot", "ironbow"), default="white-hot",
                   help="infrared palette (default: white-hot grey)")
    p.add_argument("--compare", action="store_true", help="also write compare/<name>.png: visible | semantic | IR")
    p.add_argument("--truth", help="with --compare: true infrared FILE|DIR named like the inputs, shown beside")
    p.add_argument("--save-attention", action="store_true",
                   help="also write attention/<name>/: adapter heat-maps (mode cross_attention)")
    p.set_defaults(func=_cmd_generate)


def _add_visualize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="adapter attention heat-maps over the visible image(s)")
    _add_generate_args(p)
    p.set_defaults(func=_cmd_visualize)


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="a labelled data set (COCO, YOLO, VOC or a folder) -> its infrared version, "
                       "same layout and annotations; shards over torchrun processes, resumes")
    _add_config_args(p)
    p.add_argument("source", metavar="SOURCE", help="the data set folder")
    p.add_argument("--out", required=True, help="the output data set folder (outside SOURCE)")
    p.add_argument("--checkpoint", help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--layout", choices=("auto", "coco", "yolo", "voc", "plain"), default="auto",
                   help="the source's layout (default: detected)")
    p.add_argument("--semantic", help="semantic maps, where the model reads them: default the data set's own boxes; "
                   "'auto' (panoptic segmenter), 'none' (a model trained with train.semantic_dropout), or a folder "
                   "of maps named like the photos")
    p.add_argument("--boxes", help="one box source for every photo (as generate --boxes), e.g. for a plain folder")
    p.add_argument("--box-classes", action="append", metavar="NAME=CLASS",
                   help="map a box category to a palette class or to 'ignore' (repeatable; default: by name)")
    _add_segment_model_arg(p, "for --semantic auto")
    p.add_argument("--format", choices=("source", "png"), default="source",
                   help="image format: each photo's own (the annotations unchanged) or PNG (default: source)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), default=8, help="grey bit depth (16: PNG or TIFF)")
    p.add_argument("--palette", choices=("white-hot", "black-hot", "ironbow"), default="white-hot",
                   help="infrared palette (default: white-hot grey)")
    p.add_argument("--seed", type=int, help="seed of every image's noise (default: sample.seed)")
    p.add_argument("--steps", type=int, help="denoising steps (default: sample.steps)")
    p.add_argument("--guidance", type=float, help="guidance (default: sample.guidance)")
    p.add_argument("--size", type=_size, help="the longer side the model generates at (as generate --size); the "
                   "images keep their photos' sizes")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (default: 1)")
    p.add_argument("--workers", type=int, default=2, help="loader processes reading photos (default: 2)")
    p.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda:$LOCAL_RANK if available)")
    p.add_argument("--finalize", action="store_true", help="only carry the annotations over and write the card "
                   "(when every photo is done; also after a finalize that was killed)")
    p.set_defaults(func=_cmd_translate)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from vis2ir.config import PRED_VALUES

    p = sub.add_parser("evaluate", help="score predictions against truths, or a checkpoint on a data split")
    _add_config_args(p)
    p.add_argument("--pred", help="folder of predicted infrared images (paired with --truth by file name)")
    p.add_argument("--truth", help="folder of ground-truth infrared images")
    p.add_argument("--semantic", help="folder of semantic maps named like the truths (per-class metrics)")
    p.add_argument("--recursive", action="store_true", help="also the truths in the sub-folders of --truth, paired "
                   "with --pred/--semantic files at the same relative path (or of the same name in a flat folder)")
    p.add_argument("--pred-values", choices=PRED_VALUES, default="auto",
                   help="16-bit/float predictions: auto (vis2ir's own 16-bit outputs at full range, others by "
                   "data.ir_normalize like the truths), full-range (value/65535) or ir-normalize (default: auto)")
    p.add_argument("--checkpoint", help="checkpoint or run folder: generate on --split of the data source, then score")
    p.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to score (default: test)")
    p.add_argument("--limit", type=int, help="score the first N samples of the split (default: eval.limit, else all)")
    p.add_argument("--out", default="outputs/evaluate", help="report folder (default: outputs/evaluate)")
    p.add_argument("--device", help="e.g. cuda:0 or cpu (default: cuda:$LOCAL_RANK if available)")
    p.set_defaults(func=_cmd_evaluate)


def _add_ablate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ablate", help="train and evaluate every variant of a grid of settings; tabulate")
    _add_config_args(p)
    p.add_argument("--grid", action="append", metavar="KEY=V1,V2,...",
                   help="a setting and its values (repeatable: the variants are the cartesian product)")
    p.add_argument("--plan", metavar="FILE", help="several grids: a YAML list of {KEY: [V1, V2, ...]} mappings, "
                   "whose variants are run one after the other (with --grid: after its own)")
    p.add_argument("--seeds", default="0", help="seeds of every variant, e.g. 0,1 (default: 0)")
    p.add_argument("--out", default="runs/ablate", help="ablation folder (default: runs/ablate)")
    p.add_argument("--shard", default="0/1", metavar="I/N", help="run every N-th variant from I (one process per GPU)")
    p.add_argument("--collect", action="store_true", help="only tabulate the finished variants")
    p.add_argument("--device", help="device for generation during evaluation (default: cuda:$LOCAL_RANK if available)")
    p.set_defaults(func=_cmd_ablate)


# The subcommands in the order `vis2ir --help` lists them: each builder adds its parser and arguments.
COMMANDS = (_add_demo, _add_app, _add_train, _add_config, _add_data, _add_segment, _add_generate, _add_visualize,
            _add_translate, _add_evaluate, _add_ablate)


def build_parser() -> argparse.ArgumentParser:
    """The `vis2ir` parser: `--debug`, `--threads` and one subcommand of `COMMANDS`, each with its `func` to run."""
    parser = argparse.ArgumentParser(prog="vis2ir", description="Visible-to-infrared generation on FLUX.1 Fill.")
    parser.add_argument("--debug", action="store_true", help="DEBUG logging and full tracebacks")
    parser.add_argument("--threads", metavar="N|auto",
                        help="CPU threads for torch (default: $VIS2IR_THREADS, else auto: the cores free now, all on "
                             "an idle machine; OMP_NUM_THREADS, when set, is kept)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    _mark_overrides(parser)
    return parser


def _mark_overrides(parser: argparse.ArgumentParser) -> None:
    """Give every (sub)command that takes overrides `_parser` (for its errors) and `[key=value ...]` in its usage."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.set_defaults(_parser=sub)
                if sub.get_default("overrides") is not None:
                    sub.usage = f"{sub.format_usage().removeprefix('usage: ').strip()} [key=value ...]"
                _mark_overrides(sub)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse `argv`, collecting `key=value` overrides wherever they stand (before, between or after options)."""
    args, extras = parser.parse_known_args(argv)
    sub = getattr(args, "_parser", parser)
    overrides = [t for t in extras if OVERRIDE.match(t)]
    rest = [t for t in extras if not OVERRIDE.match(t)]
    source = getattr(args, "source", None)
    if rest and source is not None and OVERRIDE.match(source) and not rest[0].startswith("-"):
        overrides.insert(0, source)  # `data inspect key=value SOURCE`: the override took SOURCE's place
        args.source = rest.pop(0)
    if rest:
        sub.error(f"unrecognized arguments: {' '.join(rest)}")
    if overrides and getattr(args, "overrides", None) is None:
        sub.error(f"this command takes no key=value settings: {' '.join(overrides)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def quiet() -> None:
    """One log format; network and Hub libraries speak only of warnings, transformers and diffusers
    only of errors. (Lightning's loggers are routed into ours where Lightning is imported: `vis2ir.train`.)"""
    for name in ("httpx", "httpcore", "urllib3", "filelock", "huggingface_hub"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
        logger.setLevel(logging.WARNING)
    for name in ("transformers", "diffusers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


def check_output(args: argparse.Namespace) -> None:
    """Refuse an output that cannot be written (a read-only folder, a file where a folder goes) in one line,
    before anything loads: every command's --out (`data inspect`'s is its contact sheet, a file).
    `train.output_dir` is checked by `train`, the app's working folder by `serve`."""
    from vis2ir.files import check_writable

    out = getattr(args, "out", None)
    command = " ".join(filter(None, (args.command, getattr(args, "data_command", None))))
    if command == "data inspect":
        check_writable(args.out or inspect_sheet_path(args.source), f"{command} --out", file=True)
    elif out:
        check_writable(out, f"{command} --out")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="[%(levelname)s] %(message)s")
    quiet()
    try:
        if getattr(args, "overrides", None) is not None:
            from vis2ir.config import check_config

            check_config(args.config, args.overrides)  # a typo is answered before torch is imported
        check_output(args)
        if args.command != "config":  # the one command without CPU work stays without torch
            from vis2ir.io.runtime import setup_threads

            setup_threads(args.threads)  # before torch is imported: OpenMP reads its settings then
        args.func(args)
    except Vis2IRError as err:
        if args.debug:
            raise
        sys.stderr.write(f"vis2ir: error: {err}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("vis2ir: interrupted\n")
        return 130
    except Stopped as stop:  # SIGTERM / SIGUSR1 during training: the last finished step is saved
        sys.stderr.write(f"vis2ir: {stop}\n")
        return stop.exit_status  # 128 + signal, as a shell reports a process ended by it
    return 0


if __name__ == "__main__":
    sys.exit(main())
