"""imgcls: train, evaluate, predict with, export and serve image classifiers from one run folder.

Every verb keeps its state in a run folder; `imgcls COMMAND --help` lists each command's options.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import typing
from pathlib import Path

from imgcls import __version__, fileio
from imgcls.advise import advise
from imgcls.api import lr_find
from imgcls.check import REPORT_FILE, check_dataset, write_report
from imgcls.compare import PRESETS, make_pairs, markdown_table, parse_per_class, run_compare
from imgcls.config import TTA_MODES, TrainConfig, field_docs, parse_duration
from imgcls.data import load_dataset
from imgcls.data.fashion_mnist import write_contest_layout
from imgcls.ensemble import COMBINES, build_ensemble
from imgcls.errors import ImgclsError, OptionError, sigterm_as_interrupt
from imgcls.evaluate.metrics import format_table
from imgcls.evaluate.scoring import evaluate_run
from imgcls.engines import ENGINES
from imgcls.export import export_int8, export_run
from imgcls.extras import require
from imgcls.models import get_spec, list_models
from imgcls.predict import predict_folder
from imgcls.serve.batching import Batching
from imgcls.train.budget import process_age_s
from imgcls.train.distributed import is_main_process, shutdown_distributed
from imgcls.train.lr_find import curve_table
from imgcls.train.run_folder import RunFolder
from imgcls.train.runner import fit
from imgcls.train.strategies import AUTO, strategy_names


def cmd_data_fashion_mnist(args: argparse.Namespace) -> int:
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


def _value_type(annotation) -> type:
    """int for `int | None`, str for `str`: the type a command-line value converts to."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def _parse_with(parse):
    """An argparse type from a library parser: its OptionError becomes argparse's own message."""
    def convert(text: str):
        try:
            return parse(text)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = parse.__name__
    return convert


def add_config_options(parser: argparse.ArgumentParser, cls: type, only: tuple[str, ...] | None = None,
                       skip: tuple[str, ...] = (), known_at_run_time: dict[str, str] | None = None) -> None:
    """One option per dataclass field: name, type, default and help all come from the field.

    A bool that defaults to on becomes --no-NAME; metadata may rename the flag ("flag"), give a
    parser ("parse"), the valid values ("choices"), or keep the field off the command line ("option").
    `known_at_run_time` adds what only the running program knows (e.g. the registered strategies).
    """
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if (only is not None and f.name not in only) or f.name in skip or not f.metadata.get("option", True):
            continue
        flag = "--" + f.metadata.get("flag", f.name.replace("_", "-"))
        text = " ".join([docs[f.name], *(known_at_run_time or {}).get(f.name, "").split()]).replace("%", "%%")
        kind = _value_type(hints[f.name])
        if kind is bool and f.default is True:
            parser.add_argument("--no-" + flag[2:], dest=f.name, action="store_false", default=True,
                                help=f"{text} (default: on; this flag turns it off)")
        elif kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=f"{text} (default: off)")
        else:
            shown = f.metadata.get("unset", "unset") if f.default is None else f.default
            parser.add_argument(flag, dest=f.name, type=_parse_with(f.metadata.get("parse", kind)),
                                default=f.default, choices=f.metadata.get("choices"),
                                metavar=None if f.metadata.get("choices") else flag[2:].upper().replace("-", "_"),
                                help=f"{text} (default: {shown})")


def config_from_args(cls: type, args: argparse.Namespace):
    """The dataclass built from the options add_config_options declared for it."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


DATASET_OPTIONS = ("csv", "id_column", "label_column")  # TrainConfig fields shared with check and advise


def cmd_train(args: argparse.Namespace) -> int:
    config = config_from_args(TrainConfig, args)
    try:
        # The budget counts the whole command, from the process's start (the imports too).
        run = fit(config, args.out, overwrite=args.overwrite, resume=args.resume, device=args.device,
                  started=time.perf_counter() - process_age_s())
        main_process = is_main_process()
    finally:
        shutdown_distributed()
    if main_process:  # under torchrun every rank returns the run; one line is enough
        best = run["best_val_acc"]
        unvalidated = "no validation split" if run["data"]["val"] == 0 else "no pass validated an image"
        kept = (f"best validation accuracy {best:.4f} at epoch {run['best_epoch']}" if best is not None else
                f"{unvalidated}: kept the last model (epoch {run['best_epoch']})")
        print(f"{kept} ({run['train_seconds']:.0f}s in all); run folder: {args.out}")
    return 0


LR_FIND_IGNORES = ("data_dir", "lr", "epochs", "time_budget_s", "schedule", "warmup_epochs", "head_probe_epochs")


def cmd_lr_find(args: argparse.Namespace) -> int:
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
               if f.name not in LR_FIND_IGNORES and hasattr(args, f.name)}
    finding = lr_find(args.data_dir, device=args.device, **options)
    print(curve_table(finding))
    if finding.suggestion is None:
        print("no suggestion: the loss never fell for long enough; check the data or train with the default --lr")
    else:
        print(f"suggested learning rate {finding.suggestion:.3g} (train with --lr {finding.suggestion:.3g}, "
              f"or --lr auto to run this test at the start of training)")
    if args.json:
        fileio.write_json(args.json, finding.to_json())
        print(f"wrote {args.json}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    metrics = evaluate_run(args.run, args.data_dir, args.labels, device=args.device, tta=args.tta)
    print(format_table(metrics))
    names = ", ".join((RunFolder.EVAL, RunFolder.CONFUSION_CSV, RunFolder.CONFUSION_PNG))
    print(f"wrote {names} to {args.run}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    result = predict_folder(args.run, args.test_dir, args.out, device=args.device, engine=args.engine,
                            tta=args.tta, top_k=args.top_k, log=print)
    print(f"wrote {result['rows']} predictions to {result['out']} ({result['engine']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.int8:
        result = export_int8(args.run, args.out)
        q = result["quantization"]
        print(f"wrote {result['path']} and {result['sidecar']} (int8, validation accuracy "
              f"{q['validation_accuracy_fp32']:.4f} -> {q['validation_accuracy_int8']:.4f} on "
              f"{q['validation_images']} images: {q['accuracy_loss_points']:+.2f} points lost; "
              f"{q['agreement']:.1%} of fp32's labels kept; first {q['fp32_convs']} convolutions in fp32)")
        if q["agreement"] < q["min_agreement"]:
            print(f"note: below the {q['min_agreement']:.0%} agreement `--engine auto` asks, so auto will not "
                  "choose it; --engine onnx-int8 runs it")
        return 0
    result = export_run(args.run, args.out, args.format)
    print(f"wrote {result['path']} and {result['sidecar']} (input uint8 NHWC "
          f"{result['input']['shape'][1:]}, {len(result['classes']['labels'])} classes)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    for module in ("fastapi", "uvicorn", "multipart"):
        require(module, "imgcls serve")
    from imgcls.serve.app import serve  # fastapi and uvicorn: needed only to serve

    serve(args.run, host=args.host, port=args.port, engine=args.engine, device=args.device, tta=args.tta,
          batching=config_from_args(Batching, args), workers=args.workers)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
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
    add_config_options(p, TrainConfig, only=DATASET_OPTIONS)


def add_train_parser(sub, verb: str = "train") -> None:
    if verb == "distill":
        t = sub.add_parser("distill", help="train a student on a teacher's probabilities (train with --teacher)",
                           description="Train a student model on the probabilities a teacher run or ensemble "
                                       "gives each training image, mixed with the labels (--distill-weight).")
    else:
        t = sub.add_parser("train", help="train a model into a run folder",
                           description="Train a model into a run folder; the same command again resumes it.")
    t.add_argument("data_dir", metavar="TRAIN_DIR", help="training data folder (train.csv + images/, or class "
                                                         "subfolders)")
    t.add_argument("--out", required=True, help="run folder to write (re-running resumes it)")
    add_config_options(t, TrainConfig, skip=("data_dir",),
                       known_at_run_time={"strategy": f"Registered: {' / '.join(strategy_names())} / {AUTO}."})
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run in --out: removes only the files imgcls wrote there, and only from a "
                        "folder that is provably a run folder (default: off)")
    t.add_argument("--resume", action="store_true",
                   help="only continue the run in --out; refuse when it holds no run yet (default: off; an "
                        "incomplete run resumes without it too)")
    t.add_argument("--device", default="auto", help="auto / cpu / cuda / cuda:N (default: auto)")
    t.set_defaults(func=cmd_train)
    if verb == "distill":
        t.set_defaults(func=cmd_distill)


def cmd_distill(args: argparse.Namespace) -> int:
    if not args.teacher:
        raise OptionError("imgcls distill needs --teacher RUN (a finished run or ensemble folder)")
    return cmd_train(args)


def add_distill_parser(sub) -> None:
    add_train_parser(sub, "distill")


def cmd_ensemble(args: argparse.Namespace) -> int:
    run = build_ensemble(args.runs, args.out, combine=args.combine, overwrite=args.overwrite, device=args.device)
    weights = ", ".join(f"{m['weight']:.3f}" for m in run["members"])
    accuracy = "" if run["best_val_acc"] is None else f"; held-out accuracy {run['best_val_acc']:.4f}"
    print(f"ensemble of {len(run['members'])} runs (weights {weights}){accuracy}; folder: {args.out}")
    return 0


def add_ensemble_parser(sub) -> None:
    e = sub.add_parser("ensemble", help="combine finished runs into an ensemble run folder",
                       description="Write a run folder whose probabilities are the weighted mean of its "
                                   "members'; predict, evaluate, serve and export accept it like any run.")
    e.add_argument("runs", nargs="+", metavar="RUN", help="member run folders (same classes and image layout)")
    e.add_argument("--out", required=True, help="ensemble folder to write")
    e.add_argument("--combine", default="mean", choices=COMBINES,
                   help="mean: equal weights; fit: weights that maximise the likelihood of the validation "
                        "images no member trained on (default: mean)")
    e.add_argument("--overwrite", action="store_true", help="replace an earlier run or ensemble in --out "
                                                            "(default: off)")
    e.add_argument("--device", default="auto", help="auto / cpu / cuda (default: auto)")
    e.set_defaults(func=cmd_ensemble)


def add_lr_find_parser(sub) -> None:
    f = sub.add_parser("lr-find", help="learning-rate range test: the loss at growing learning rates, and a suggestion",
                       description="Trains 100 steps at learning rates growing from 1e-7 to 10 (fastai's lr_find), "
                                   "with the batch size, augmentation and model of the same `imgcls train` "
                                   "options; nothing is written unless --json.")
    f.add_argument("data_dir", metavar="TRAIN_DIR", help="training data folder (train.csv + images/, or class "
                                                         "subfolders)")
    add_config_options(f, TrainConfig, skip=LR_FIND_IGNORES)
    f.add_argument("--json", help="also write the rates, losses and suggestion to this JSON file")
    f.add_argument("--device", default="auto", help="auto / cpu / cuda / cuda:N (default: auto)")
    f.set_defaults(func=cmd_lr_find)


def add_tta_option(parser) -> None:
    parser.add_argument("--tta", default="none", choices=TTA_MODES,
                        help="flip: average the predictions for each image and its mirror image "
                             "(for classes that look the same mirrored; costs 2x the inference time); "
                             "flip-shift: also both moved one pixel diagonally each way (6x)")


def add_evaluate_parser(sub) -> None:
    e = sub.add_parser("evaluate", help="score a run on labelled data or against an answer key")
    e.add_argument("run", help="run folder")
    e.add_argument("data_dir", help="folder with a CSV (labelled, or ids only with --labels)")
    e.add_argument("--labels", help="answer key CSV (id,label)")
    e.add_argument("--device", default="auto")
    add_tta_option(e)
    e.set_defaults(func=cmd_evaluate)


def add_engine_option(parser) -> None:
    parser.add_argument("--engine", default="auto", choices=list(ENGINES),
                        help="auto: the fastest engine measured on this machine whose predictions match eager "
                             "fp32 (recorded in RUN/engine.json); torch: eager fp32; torch-bf16: bf16 autocast; "
                             "onnx / onnx-int8: ONNX Runtime on the exported fp32 / int8 graph (exported on first use)")


def add_predict_parser(sub) -> None:
    p = sub.add_parser("predict", help="predict a test folder, a folder of images or one image into a CSV")
    p.add_argument("run", help="run folder")
    p.add_argument("test_dir", metavar="TEST_DIR|IMAGE",
                   help="folder with test.csv + images/ (rows in test.csv order), a folder of loose images "
                        "(one row per image, by file name) or one image file")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--top-k", type=int, metavar="K",
                   help="write the K most probable classes of each image with their probabilities, best "
                        "first (default: the predicted label only)")
    p.add_argument("--device", default="auto")
    add_engine_option(p)
    add_tta_option(p)
    p.set_defaults(func=cmd_predict)


def add_export_parser(sub) -> None:
    x = sub.add_parser("export", help="export a run's model with its preprocessing (ONNX or TorchScript)")
    x.add_argument("run", help="run folder")
    x.add_argument("--format", default="onnx", choices=["onnx", "torchscript"])
    x.add_argument("--out", help="model file to write (default: inside the run folder); sidecar is <out>.json")
    x.add_argument("--int8", action="store_true",
                   help="ONNX static int8 (QDQ, per-channel), calibrated on training images; refused when it "
                        "loses more than 0.5 points of validation accuracy; the first convolutions stay fp32 "
                        "when that keeps the bound or 98%% of fp32's labels")
    x.set_defaults(func=cmd_export)


def workers_count(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of processes or auto, not {text!r}") from None


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="HTTP prediction server with an upload page")
    s.add_argument("run", help="run folder (or an exported .onnx with --engine onnx)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    s.add_argument("--port", type=int, default=8000)
    add_engine_option(s)
    s.add_argument("--workers", type=workers_count, default="auto",
                   help="server processes, each with its own model and cores/N intra-op threads; auto: one a "
                        "core (at most 4) on a CPU, one on a GPU (default auto)")
    s.add_argument("--device", default="auto")
    add_tta_option(s)
    add_config_options(s, Batching)
    s.set_defaults(func=cmd_serve)


def cmd_check(args: argparse.Namespace) -> int:
    report = check_dataset(args.data_dir, id_column=args.id_column, label_column=args.label_column,
                           csv_path=args.csv, require_labels=not args.unlabelled)
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
    advice = advise(args.train_dir, probe_per_class=args.probe_per_class, seed=args.seed, device=args.device,
                    id_column=args.id_column, label_column=args.label_column, csv_path=args.csv)
    print(advice.summary())
    if args.json:
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
    if changes:  # the user chose the grid: the preset's extra cells, teaching and ensembles belong to the preset's
        changes.update(extra=(), teaching=(), ensembles=())
    if args.time_budget:
        changes["time_budget_s"] = parse_duration(args.time_budget)
    if args.test_limit is not None:
        changes["test_limit"] = args.test_limit or None
    return dataclasses.replace(grid, **changes)


def cmd_compare(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    rows, report = run_compare(args.train_dir, args.test, args.out, grid_from_args(args), args.labels,
                               with_advice=not args.no_advise)
    print(markdown_table(rows))
    print(f"{len(rows)} runs in {args.out} ({time.perf_counter() - t0:.0f}s this time); "
          f"leaderboard: {Path(args.out) / 'leaderboard.csv'}; report: {report}")
    return 0


def add_compare_parser(sub) -> None:
    c = sub.add_parser("compare", help="grid of models x strategies x labelled-set sizes x seeds, with a report",
                       description="Every cell is a run folder under --out; re-running skips finished cells.")
    c.add_argument("train_dir", help="training data folder")
    c.add_argument("--test", required=True, help="test folder scored by every cell")
    c.add_argument("--labels", help="answer key CSV for the test folder (id,label)")
    c.add_argument("--out", required=True, help="compare folder (cells, leaderboard.csv, report.html)")
    c.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: the demo's story (scratch, transfer, the student taught by pseudo-labels), under "
                        "30 min on 2 CPU cores; grid: scratch vs head vs finetune at 10/100/1000 per class in "
                        "75-s cells; full: 5 strategies x 4 sizes x 3 seeds")
    c.add_argument("--models", help="comma-separated registry names (overrides the preset)")
    c.add_argument("--strategies", help=f"comma-separated: {','.join(strategy_names())}")
    c.add_argument("--per-class", help="labelled images per class, e.g. 10,100,1000,all")
    c.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2")
    c.add_argument("--time-budget", help="training budget per cell, e.g. 90s")
    c.add_argument("--test-limit", type=int, help="score on this many fixed test images (0: all)")
    c.add_argument("--no-advise", action="store_true", help="skip the advisor's measurement")
    c.set_defaults(func=cmd_compare)


PARSERS = [add_data_parser, add_train_parser, add_distill_parser, add_ensemble_parser, add_lr_find_parser,
           add_evaluate_parser, add_predict_parser, add_models_parser,
           add_export_parser, add_serve_parser, add_check_parser, add_advise_parser, add_compare_parser]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgcls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"imgcls {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in PARSERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with sigterm_as_interrupt():
            return args.func(args)
    except ImgclsError as exc:  # the user's input or environment; anything else is a bug and shows its traceback
        print(f"imgcls: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C 130, SIGTERM 143 (Terminated)
        return getattr(exc, "exit_code", 130)


if __name__ == "__main__":
    raise SystemExit(main())
