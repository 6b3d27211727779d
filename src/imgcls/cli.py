"""Thin command line: one function per verb, each a call into the library."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from imgcls.errors import ImgclsError, sigterm_as_interrupt


def cmd_data_fashion_mnist(args: argparse.Namespace) -> int:
    from imgcls.data import load_dataset
    from imgcls.data.fashion_mnist import write_contest_layout

    t0 = time.perf_counter()
    info = write_contest_layout(args.out, Path(args.source) if args.source else None,
                                args.limit_train, args.limit_test)
    t1 = time.perf_counter()
    # Build the decode caches now so the first training epoch starts at once.
    load_dataset(Path(args.out) / "train")
    load_dataset(Path(args.out) / "test", require_labels=False)
    t2 = time.perf_counter()
    print(f"wrote {info['train']} train + {info['test']} test images to {info['out']} "
          f"from {info['source']} in {t1 - t0:.1f}s; cache built in {t2 - t1:.1f}s")
    return 0


def config_from_args(args: argparse.Namespace):
    from imgcls.config import TrainConfig, parse_duration

    return TrainConfig(
        data_dir=str(args.train_dir), model=args.model, strategy=args.strategy,
        pretrained=args.pretrained, weights=args.weights, epochs=args.epochs,
        time_budget_s=parse_duration(args.time_budget), batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, schedule=args.schedule,
        augment=args.augment, val_fraction=args.val_fraction, seed=args.seed, image_size=args.image_size,
        resize=args.resize,
        precision=args.precision, channels_last=not args.no_channels_last, freeze_stages=args.freeze_stages,
        backbone_lr_mult=args.backbone_lr_mult, warmup_epochs=args.warmup_epochs, bn_stats=args.bn_stats,
        head_probe_epochs=args.head_probe_epochs, per_class=args.per_class,
        cache_features=not args.no_cache_features,
        on_bad_image=args.on_bad_image, id_column=args.id_column, label_column=args.label_column)


def cmd_train(args: argparse.Namespace) -> int:
    from imgcls.train.distributed import is_main_process, shutdown_distributed
    from imgcls.train.runner import fit

    config = config_from_args(args)
    try:
        run = fit(config, args.out, overwrite=args.overwrite, device=args.device)
        main_process = is_main_process()
    finally:
        shutdown_distributed()
    if main_process:  # under torchrun every rank returns the run; one line is enough
        print(f"best validation accuracy {run['best_val_acc']:.4f} at epoch {run['best_epoch']} "
              f"({run['train_seconds']:.0f}s of training); run folder: {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from imgcls.evaluate.metrics import format_table
    from imgcls.evaluate.scoring import evaluate_run

    metrics = evaluate_run(args.run, args.data_dir, args.labels, device=args.device, tta=args.tta)
    print(format_table(metrics))
    print(f"wrote eval.json, confusion.csv and confusion.png to {args.run}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from imgcls.predict import predict_folder

    result = predict_folder(args.run, args.test_dir, args.out, device=args.device, engine=args.engine,
                            tta=args.tta)
    print(f"wrote {result['rows']} predictions to {result['out']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from imgcls.export import export_run

    result = export_run(args.run, args.out, args.format)
    print(f"wrote {result['path']} and {result['sidecar']} (input uint8 NHWC "
          f"{result['input']['shape'][1:]}, {len(result['classes']['labels'])} classes)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from imgcls.serve.app import serve

    serve(args.run, host=args.host, port=args.port, engine=args.engine, device=args.device, tta=args.tta)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from imgcls.models import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        print(f"{name:<24} {spec.description}")
    return 0


def add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="import a known dataset into the contest layout")
    data_sub = data.add_subparsers(dest="dataset", required=True)
    fm = data_sub.add_parser("fashion-mnist", help="Fashion-MNIST (Debian package, cache or download)")
    fm.add_argument("out", help="output folder (gets train/, test/, test_labels.csv, classes.json)")
    fm.add_argument("--source", help="folder with the four IDX .gz files (default: auto)")
    fm.add_argument("--limit-train", type=int, help="only the first N training images")
    fm.add_argument("--limit-test", type=int, help="only the first N test images")
    fm.set_defaults(func=cmd_data_fashion_mnist)


def add_dataset_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--id-column", help="name of the image-id column (default: detected)")
    p.add_argument("--label-column", help="name of the label column (default: detected)")


def add_train_parser(sub) -> None:
    from imgcls.config import BN_STATS, SMALL_DATA_BELOW, TrainConfig
    from imgcls.train.strategies import AUTO, strategy_names

    d = TrainConfig(data_dir="")
    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("train_dir", help="training data folder (train.csv + images/, or class subfolders)")
    t.add_argument("--out", required=True, help="run folder to write (re-running resumes it)")
    t.add_argument("--model", default=d.model, help="registry name (see `imgcls models`)")
    t.add_argument("--strategy", default=d.strategy, help=f"{' / '.join(strategy_names())} / {AUTO} (measured by `imgcls advise`)")
    t.add_argument("--pretrained", action="store_true", help="start from ImageNet weights")
    t.add_argument("--weights", help="weight file to start from (safetensors or state dict)")
    t.add_argument("--epochs", type=int, default=d.epochs)
    t.add_argument("--time-budget", help="fit training into this much time, e.g. 5m")
    t.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="global batch: under torchrun each of N processes takes batch/N of it")
    t.add_argument("--lr", type=float, default=d.lr)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--schedule", default=d.schedule, choices=["onecycle", "cosine", "constant"])
    t.add_argument("--augment", default=d.augment, help="auto, none, or parts joined by -: flip, shift / shiftN (stored-image px), erase; e.g. flip-shift4-erase")
    t.add_argument("--val-fraction", type=float, default=d.val_fraction)
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--image-size", type=int, help="model input side in pixels")
    t.add_argument("--resize", default=d.resize, choices=["crop", "squash", "pad"], help="fit images of another shape to the stored square: crop the centre, squash, or pad with black")
    t.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "mixed"],
                   help="auto: bf16 where the hardware is fast at it, and on CPU 'mixed' for models with "
                        "depthwise convolutions; mixed: bf16 with the depthwise convolutions of training "
                        "steps in fp32")
    t.add_argument("--no-channels-last", action="store_true", help="keep NCHW memory format")
    t.add_argument("--freeze-stages", type=int, help="partial: frozen stem-side stages")
    t.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult)
    t.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs,
                   help="finetune: head-only epochs on images before the backbone trains")
    t.add_argument("--head-probe-epochs", type=int, default=d.head_probe_epochs,
                   help="finetune / partial: fit the new head on cached frozen features first (LP-FT); "
                        "0: skip; default: 30 when the pretrained BatchNorm statistics are kept, else 0")
    t.add_argument("--bn-stats", default=d.bn_stats, choices=BN_STATS,
                   help="BatchNorm statistics of trainable layers: adapt to the data (train) or keep the "
                        "pretrained ones (frozen; suits small data and LP-FT); auto: frozen when "
                        f"fine-tuning on fewer than {SMALL_DATA_BELOW:,} images")
    t.add_argument("--no-cache-features", action="store_true",
                   help="head: run the frozen backbone every epoch (lets --augment apply)")
    t.add_argument("--per-class", type=int, help="at most N training images per class")
    t.add_argument("--on-bad-image", default=d.on_bad_image, choices=["fail", "skip"])
    t.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    t.add_argument("--resume", action="store_true", help="continue the run in --out (the default when it is incomplete)")
    t.add_argument("--device", default="auto", help="auto / cpu / cuda / cuda:N")
    add_dataset_options(t)
    t.set_defaults(func=cmd_train)


def add_tta_option(parser) -> None:
    from imgcls.config import TTA_MODES

    parser.add_argument("--tta", default="none", choices=TTA_MODES,
                        help="flip: average the predictions for each image and its mirror image "
                             "(for classes that look the same mirrored; costs 2x the inference time)")


def add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="score a run on labelled data or against an answer key")
    e.add_argument("run", help="run folder")
    e.add_argument("data_dir", help="folder with a CSV (labelled, or ids only with --labels)")
    e.add_argument("--labels", help="answer key CSV (id,label)")
    e.add_argument("--device", default="auto")
    add_tta_option(e)
    e.set_defaults(func=cmd_evaluate)


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict a test folder into a submission CSV")
    p.add_argument("run", help="run folder")
    p.add_argument("test_dir", help="folder with test.csv + images/")
    p.add_argument("--out", required=True, help="submission CSV to write")
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", default="torch", choices=["torch", "onnx"],
                   help="onnx: ONNX Runtime on the exported graph (exported on first use)")
    add_tta_option(p)
    p.set_defaults(func=cmd_predict)


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="export a run's model with its preprocessing (ONNX or TorchScript)")
    x.add_argument("run", help="run folder")
    x.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    x.add_argument("--out", help="model file to write (default: inside the run folder); sidecar is <out>.json")
    x.set_defaults(func=cmd_export)


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="HTTP prediction server with an upload page")
    s.add_argument("run", help="run folder (or an exported .onnx with --engine onnx)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--engine", default="torch", choices=["torch", "onnx"])
    s.add_argument("--device", default="auto")
    add_tta_option(s)
    s.set_defaults(func=cmd_serve)


def cmd_check(args: argparse.Namespace) -> int:
    from imgcls.check import REPORT_FILE, check_dataset, write_report

    report = check_dataset(args.data_dir, id_column=args.id_column, label_column=args.label_column,
                           require_labels=not args.unlabelled)
    out = Path(args.report) if args.report else Path(args.data_dir) / REPORT_FILE
    try:
        write_report(report, out)
    except OSError as exc:
        raise ImgclsError(f"{out}: cannot write the report ({exc.strerror}); choose a place with --report") from None
    print(report.summary())
    print(f"wrote {out}")
    return report.exit_code


def add_check_parser(sub) -> None:
    c = sub.add_parser("check", help="scan a dataset for problems without training",
                       description="Exit codes: 0 clean, 6 problems found (listed, also in the report), 3 no such folder.")
    c.add_argument("data_dir", help="dataset folder (CSV + images/, or class subfolders)")
    c.add_argument("--report", help="where to write the JSON report (default: DATA_DIR/check_report.json)")
    c.add_argument("--unlabelled", action="store_true", help="a test set: ids only, no label column")
    add_dataset_options(c)
    c.set_defaults(func=cmd_check)


def add_models_parser(sub) -> None:
    m = sub.add_parser("models", help="list the registered models")
    m.set_defaults(func=cmd_models)


def cmd_advise(args: argparse.Namespace) -> int:
    from imgcls.advise import advise

    advice = advise(args.train_dir, probe_per_class=args.probe_per_class, seed=args.seed, device=args.device,
                    id_column=args.id_column, label_column=args.label_column)
    print(advice.summary())
    if args.json:
        from imgcls import fileio
        fileio.write_json(args.json, {**advice.to_json(), "summary": advice.summary()})
        print(f"wrote {args.json}")
    return 0


def add_advise_parser(sub) -> None:
    a = sub.add_parser("advise", help="measure data size and ImageNet similarity; recommend a transfer strategy")
    a.add_argument("train_dir", help="training data folder (train.csv + images/, or class subfolders)")
    a.add_argument("--probe-per-class", type=int, default=100, help="training images per class in the probes")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", help="also write the evidence and verdict to this JSON file")
    a.add_argument("--device", default="auto")
    add_dataset_options(a)
    a.set_defaults(func=cmd_advise)


def grid_from_args(args: argparse.Namespace):
    """The preset, with any of --models/--strategies/--per-class/--seeds/--time-budget/--test-limit overriding it."""
    import dataclasses

    from imgcls.compare import PRESETS, make_pairs, parse_per_class
    from imgcls.config import parse_duration

    grid = PRESETS[args.preset]
    changes: dict = {}
    if args.models or args.strategies:
        models = args.models.split(",") if args.models else sorted({m for m, _ in grid.pairs}, key=str)
        strategies = args.strategies.split(",") if args.strategies else sorted({s for _, s in grid.pairs})
        changes["pairs"] = make_pairs([m.strip() for m in models], [s.strip() for s in strategies])
    if args.per_class:
        changes["per_class"] = parse_per_class(args.per_class)
    if args.seeds:
        changes["seeds"] = tuple(int(s) for s in args.seeds.split(","))
    if changes:  # the user chose the grid: the preset's extra cells belong to the preset's grid
        changes["extra"] = ()
    if args.time_budget:
        changes["time_budget_s"] = parse_duration(args.time_budget)
    if args.test_limit is not None:
        changes["test_limit"] = args.test_limit or None
    return dataclasses.replace(grid, **changes)


def cmd_compare(args: argparse.Namespace) -> int:
    from imgcls.compare import markdown_table, run_compare

    t0 = time.perf_counter()
    rows, report = run_compare(args.train_dir, args.test, args.out, grid_from_args(args), args.labels,
                               with_advice=not args.no_advise)
    print(markdown_table(rows))
    print(f"{len(rows)} runs in {args.out} ({time.perf_counter() - t0:.0f}s this time); "
          f"leaderboard: {Path(args.out) / 'leaderboard.csv'}; report: {report}")
    return 0


def add_compare_parser(sub) -> None:
    from imgcls.compare import PRESETS
    from imgcls.train.strategies import strategy_names

    c = sub.add_parser("compare", help="grid of models x strategies x labelled-set sizes x seeds, with a report",
                       description="Every cell is a run folder under --out; re-running skips finished cells.")
    c.add_argument("train_dir", help="training data folder")
    c.add_argument("--test", required=True, help="test folder scored by every cell")
    c.add_argument("--labels", help="answer key CSV for the test folder (id,label)")
    c.add_argument("--out", required=True, help="compare folder (cells, leaderboard.csv, report.html)")
    c.add_argument("--preset", default="quick", choices=sorted(PRESETS), help="quick: ~20 min on 2 CPU cores")
    c.add_argument("--models", help="comma-separated registry names (overrides the preset)")
    c.add_argument("--strategies", help=f"comma-separated: {','.join(strategy_names())}")
    c.add_argument("--per-class", help="labelled images per class, e.g. 10,100,1000,all")
    c.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    c.add_argument("--time-budget", help="training budget per cell, e.g. 90s")
    c.add_argument("--test-limit", type=int, help="score on this many fixed test images (0: all)")
    c.add_argument("--no-advise", action="store_true", help="skip the advisor's measurement")
    c.set_defaults(func=cmd_compare)


PARSERS = [add_data_parser, add_train_parser, add_evaluate_parser, add_predict_parser, add_models_parser,
           add_export_parser, add_serve_parser, add_check_parser, add_advise_parser, add_compare_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcls", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except ImgclsError as exc:
        print(f"imgcls: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # bad option values from the library (unknown model, strategy, ...)
        print(f"imgcls: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C 130, SIGTERM 143 (Terminated)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    raise SystemExit(main())
