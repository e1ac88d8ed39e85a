"""The ``dscl`` command: pretrain, classify, evaluate, run, report, predict, export, config, study.

Exit codes: 0 done; 2 a user error (``dscl.errors.UserError``: bad config, bad data, a checkpoint
that does not fit, an unusable run folder, a missing device), printed as one line and checked
before any training starts (``DSCL_DEBUG=1`` shows the traceback instead); 75 a stage stopped by
SIGTERM/SIGINT after writing its checkpoint; 1 a non-finite loss, a failed report, or a bug (with
its traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from dscl import __version__, runfiles
from dscl.errors import RunFolderError
from dscl.plugins import load_entry_points
from dscl.study import add_study_parser, cmd_study


class _IntermixedParser(argparse.ArgumentParser):
    """A subcommand's parser whose options and positional arguments may come in any order.

    ``dscl pretrain --name x a=1 --overwrite b=2`` keeps ``b=2`` as an override: the subparsers
    action calls :meth:`parse_known_args`, which here parses intermixed (options first, then the
    positional arguments from whatever is left).
    """

    _intermixing = False  # set while the intermixed parse runs the two plain passes

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:
            return super().parse_known_args(args, namespace)
        return self.parse_known_intermixed_args(args, namespace)

    def parse_known_intermixed_args(self, args=None, namespace=None):
        self._intermixing = True
        try:
            return super().parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML file or shipped config name (e.g. fashion_mnist_lt)")
    p.add_argument("--name", help="run name: the run folder is <output_dir>/<name>")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key.sub=value",
        help="config overrides (may come before, between or after the options)",
    )


def _add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        choices=("yes", "auto"),
        help="--resume: continue the interrupted stage of this run folder; --resume auto: the "
        "same when the folder holds an unfinished run of this config, a fresh run when it holds "
        "none (for schedulers that resubmit one command line)",
    )


def _normalise_resume(argv: list[str]) -> list[str]:
    """``--resume auto`` -> ``--resume=auto``; a bare ``--resume`` -> ``--resume=yes`` (so an
    override after it is never taken as its value)."""
    out: list[str] = []
    skip = False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg == "--resume" and i + 1 < len(argv) and argv[i + 1] == "auto":
            out.append("--resume=auto")
            skip = True
        elif arg == "--resume":
            out.append("--resume=yes")
        else:
            out.append(arg)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscl",
        description="Long-tailed recognition with Decoupled Supervised Contrastive Learning and "
        "Patch-Based Self Distillation.",
    )
    parser.add_argument("--version", action="version", version=f"dscl {__version__}")
    # every subcommand accepts its options and positional arguments in any order
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_IntermixedParser)
    for name, text in (
        ("pretrain", "stage 1: contrastive representation learning (or ce)"),
        ("run", "stage 1, stage 2, test evaluation and report in one go"),
    ):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("--overwrite", action="store_true", help="replace a finished run")
        _add_resume_arg(p)
    p = sub.add_parser("classify", help="stage 2: balanced linear classifier on a stage-1 model")
    _add_config_args(p)
    _add_resume_arg(p)
    p.add_argument("--pretrained", help="stage-1 checkpoint (default: <run>/pretrain.pt)")
    p = sub.add_parser("evaluate", help="evaluate a stage-2 checkpoint and write metrics.json")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="stage-2 checkpoint (default: <run>/best.pt)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p = sub.add_parser("report", help="rebuild report.html of a run folder")
    p.add_argument("run_dir")
    p = sub.add_parser("predict", help="top-k classes of images (files or folders)")
    p.add_argument("--checkpoint", required=True, help="stage-2 checkpoint (best.pt)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("paths", nargs="+")
    p = sub.add_parser("export", help="backbone weights as a plain torchvision-style state_dict")
    p.add_argument("--checkpoint", required=True, help="pretrain.pt, last.pt or best.pt")
    p.add_argument("--output", required=True, help="file to write (torch.save)")
    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    add_study_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``dscl`` command; returns the exit code.

    A :class:`~dscl.errors.UserError` prints one line and gives 2 (``DSCL_DEBUG=1`` re-raises
    it); a non-finite loss gives 1, Ctrl-C 130. Any other exception is a bug and propagates
    with its traceback. The process group, if a command made one, is destroyed at the end.
    """
    from dscl.errors import EXIT_INTERRUPTED, TrainingInterrupted, UserError

    argv = _normalise_resume(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    try:
        # installed plugins first; a config's own are imported as it is read (dscl.plugins)
        load_entry_points()
        return COMMANDS[args.command](args)
    except TrainingInterrupted as stop:
        again = [a for a in argv if not a.startswith("--resume")]
        print(
            f"dscl: {stop}; checkpoint {stop.checkpoint}. Resume with: dscl "
            f"{shlex.join(again)} --resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except UserError as err:
        if os.environ.get("DSCL_DEBUG"):
            raise
        print(f"dscl: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:
        print(f"dscl: training stopped: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dscl: interrupted", file=sys.stderr)
        return 130
    finally:
        # Only dscl.dist creates a group; if it was never imported there is none (and no torch
        # import is needed for commands such as ``config``).
        if "dscl.dist" in sys.modules:
            sys.modules["dscl.dist"].cleanup()


def resolve_config(args: argparse.Namespace, *, prefer_run_config: bool = False):
    """Defaults <- --config (or the run folder's config.yaml) <- overrides <- --name."""
    from dscl.config import build_config

    overrides = list(args.overrides) + ([f"name={args.name}"] if args.name else [])
    config_file = args.config
    if config_file is None and prefer_run_config:
        probe = build_config(None, overrides)
        saved = Path(probe.output_dir) / probe.name / runfiles.CONFIG
        config_file = saved if saved.is_file() else None
    return build_config(config_file, overrides)


def prepare_run_dir(run_dir: Path, *, overwrite: bool, resume: bool) -> None:
    """Check the run folder before any work: writable, and not a finished run to clobber."""
    if not (overwrite or resume) and runfiles.run_state(run_dir).holds_run:
        raise RunFolderError(
            f"{run_dir}: already holds a run; use --overwrite to replace it, --resume to "
            "continue it, or --name for a new one"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"  # one per process under torchrun
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunFolderError(f"{run_dir}: run folder is not writable ({err.strerror})") from None
    if resume and os.environ.get("RANK", "0") == "0":
        # a process killed while writing leaves its temporary file (atomic_write's) behind
        for stale in run_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
    # Under torchrun only rank 0 clears the folder (the process group does not exist yet, so read
    # the rank from the environment): another rank deleting files could remove rank 0's new log.
    if overwrite and not resume and os.environ.get("RANK", "0") == "0":
        for name in runfiles.RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / runfiles.TENSORBOARD, ignore_errors=True)


def make_context(cfg, run_dir: Path):
    """Distributed set-up, device, precision, data splits, views, feed settings and logger for
    one command."""
    import torch

    from dscl import dist
    from dscl.data import build_splits_for
    from dscl.data.views import ViewConfig
    from dscl.engine import runtime
    from dscl.engine.context import StageContext
    from dscl.runfiles import write_json

    d = cfg.data
    splits = build_splits_for(d)  # data problems surface here, before any process group or training
    _, world_size, local_rank = dist.init_distributed()
    runtime.set_threads(cfg.threads)
    device = runtime.select_device(cfg.device, local_rank, world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    runtime.seed_everything(cfg.seed + dist.get_rank())
    view_cfg, feed = ViewConfig.from_data(d), d.feed_settings()
    logger = runtime.RunLogger(run_dir, progress=cfg.progress)
    amp = runtime.amp_dtype(cfg.amp, device)
    ctx = StageContext(cfg, run_dir, device, amp, splits, view_cfg, feed, logger)
    summary = splits.summary(d.many_threshold, d.few_threshold)
    groups = ", ".join(f"{g} {v['classes']}" for g, v in summary["groups"].items())
    logger.info(
        f"data {d.name}: {summary['train']['total']} training images in {splits.num_classes} "
        f"classes (imbalance {summary['imbalance_ratio']:g}; {groups}), "
        f"{summary['val']['total']} validation, {summary['test']['total']} test; "
        f"device {device}, {dist.get_world_size()} process(es)"
    )
    for note in summary.get("notes", []):
        logger.info(f"data note: {note}")
    if dist.is_main_process():
        write_json(run_dir / runfiles.DATA_SUMMARY, summary)
    return ctx


def _write_config(cfg, run_dir: Path) -> None:
    from dscl import dist
    from dscl.config import config_to_yaml
    from dscl.runfiles import atomic_write

    if dist.is_main_process():
        atomic_write(run_dir / runfiles.CONFIG, config_to_yaml(cfg))


@dataclass
class ResumePlan:
    """What an interrupted run folder needs, read (and checked) before any work starts."""

    stage1_state: dict | None = None  # an unfinished pretrain.pt to continue
    stage1_done: dict | None = None  # a finished pretrain.pt: stage 1 is skipped
    stage2_state: dict | None = None  # an unfinished last.pt to continue
    stage2_done: bool = False  # stage 2 finished (last.pt says so): only evaluation is left
    finished: bool = False  # nothing left to do


def plan_resume(cfg, run_dir: Path, mode: str | None, *, stage1: bool, stage2: bool) -> ResumePlan:
    """Read a run folder for ``--resume`` (``mode`` "yes") or ``--resume auto``.

    With ``auto`` the folder's config.yaml must equal ``cfg`` except for settings that do not
    change results (``dscl.config.RUNTIME_KEYS``); with either mode each checkpoint must fit
    ``cfg`` on the settings its state depends on. A newest checkpoint that cannot be read is
    reported and the previous one (``*.prev.pt``) used.
    """
    from dscl.checkpoint import read_checkpoint, read_stage1
    from dscl.config import config_to_dict, first_difference, load_yaml

    plan = ResumePlan()
    if mode is None:
        return plan
    state = runfiles.run_state(run_dir)
    if mode == "auto" and state.has(runfiles.CONFIG):
        # read strictly: a broken config.yaml is reported, not taken for a missing one
        difference = first_difference(load_yaml(run_dir / runfiles.CONFIG), config_to_dict(cfg))
        if difference:
            raise RunFolderError(
                f"{run_dir}: holds a run of another config ({difference}); use --overwrite to "
                "replace it or --name for a new run"
            )
    # Whether a stage finished is written in its checkpoint alone: read the ones present.
    if stage1 and state.stage1_checkpoint:
        saved = read_stage1(run_dir / runfiles.PRETRAIN, cfg, resume=True)
        if saved.get("finished"):
            plan.stage1_done = saved
        else:
            plan.stage1_state = saved
    if stage2 and plan.stage1_state is None and state.stage2_checkpoint:
        saved = read_checkpoint(run_dir / runfiles.LAST, ("classifier",), cfg, fallback=True)
        if saved.get("finished"):
            plan.stage2_done = True
        elif "next_batch" in saved:  # a training state (older last.pt files hold none)
            plan.stage2_state = saved
    if stage2 and plan.stage1_done is not None and state.has(runfiles.BEST):
        # classifier.mode=keep writes best.pt and no last.pt: best.pt is stage 2's end
        if cfg.stage2_mode() == "keep":
            plan.stage2_done = True
    if stage2:  # metrics.json of any split: this command's evaluation is its last step
        plan.finished = plan.stage2_done and state.has(runfiles.METRICS)
    else:
        plan.finished = plan.stage1_done is not None
    return plan


def cmd_pretrain(args, *, then_classify: bool = False) -> int:
    cfg = resolve_config(args)
    run_dir = Path(cfg.output_dir) / cfg.name
    from dscl.checkpoint import read_stage1
    from dscl.engine.pretrain import pretrain

    # checkpoints that do not fit the config stop here, before any work
    plan = plan_resume(cfg, run_dir, args.resume, stage1=True, stage2=then_classify)
    if plan.finished:
        print(f"{run_dir}: the run is finished; nothing to resume", file=sys.stderr)
        return 0
    prepare_run_dir(run_dir, overwrite=args.overwrite, resume=args.resume is not None)
    ctx = make_context(cfg, run_dir)
    _write_config(cfg, run_dir)
    with _stop_signals(ctx):
        if plan.stage1_done is None:
            stage1 = read_stage1(pretrain(ctx, plan.stage1_state), cfg)
            ctx.logger.info(f"stage 1 checkpoint: {run_dir / runfiles.PRETRAIN}")
        else:
            stage1 = plan.stage1_done
            if then_classify:
                ctx.logger.info("stage 1 is finished; going on with stage 2")
            if then_classify and not plan.stage2_done and plan.stage2_state is None:
                # stage 2 starts here: an uninterrupted run would train it where stage 1 ran
                from dscl.engine.stage import say_moved_hardware

                say_moved_hardware(ctx, stage1, ctx.device, stage="classifier", epoch=0, step=0)
        code = _classify_evaluate(ctx, stage1, plan) if then_classify else 0
    ctx.logger.close()
    return code


@contextlib.contextmanager
def _stop_signals(ctx):
    """SIGTERM/SIGINT stop training at the next step, with a checkpoint (see preemption)."""
    from dscl.engine.preemption import StopSignals

    with StopSignals() as stop:
        ctx.stop = stop
        yield


def _classify_evaluate(ctx, stage1: dict, plan: ResumePlan | None = None) -> int:
    """Stage 2 (unless finished), test evaluation and the report; exit code."""
    from dscl import dist
    from dscl.engine.classifier import evaluate_checkpoint, train_classifier
    from dscl.engine.evaluate import format_metrics_table

    plan = plan or ResumePlan()
    if plan.stage2_done:
        best = ctx.run_dir / runfiles.BEST
    else:
        best = train_classifier(ctx, stage1, plan.stage2_state)
    dist.barrier()
    metrics = evaluate_checkpoint(ctx, best, "test")
    if not dist.is_main_process():
        return 0
    print(format_metrics_table(metrics))
    from dscl.report import write_report

    try:
        print(f"report: {write_report(ctx.run_dir)}")
    except Exception as err:  # the trained model and its metrics are safe already
        print(
            f"dscl: the report could not be written ({type(err).__name__}: {err}); "
            f"best.pt and metrics.json are in place. Re-run: dscl report {ctx.run_dir}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_run(args) -> int:
    return cmd_pretrain(args, then_classify=True)


def cmd_classify(args) -> int:
    cfg = resolve_config(args, prefer_run_config=True)
    run_dir = Path(cfg.output_dir) / cfg.name
    path = Path(args.pretrained) if args.pretrained else run_dir / runfiles.PRETRAIN
    from dscl.checkpoint import read_stage1

    stage1 = read_stage1(path, cfg)  # a checkpoint that does not fit stops before any work
    plan = plan_resume(cfg, run_dir, args.resume, stage1=False, stage2=True)
    if plan.finished:
        print(f"{run_dir}: stage 2 is finished; nothing to resume", file=sys.stderr)
        return 0
    prepare_run_dir(run_dir, overwrite=False, resume=True)
    ctx = make_context(cfg, run_dir)
    with _stop_signals(ctx):
        code = _classify_evaluate(ctx, stage1, plan)
    ctx.logger.close()
    return code


def cmd_evaluate(args) -> int:
    cfg = resolve_config(args, prefer_run_config=True)
    run_dir = Path(cfg.output_dir) / cfg.name
    path = Path(args.checkpoint) if args.checkpoint else run_dir / runfiles.BEST
    from dscl.checkpoint import read_classifier
    from dscl.engine.classifier import evaluate_checkpoint
    from dscl.engine.evaluate import format_metrics_table
    from dscl.report import write_report

    loaded = read_classifier(path, cfg)  # a checkpoint that does not fit stops before any work
    prepare_run_dir(run_dir, overwrite=False, resume=True)
    ctx = make_context(cfg, run_dir)
    metrics = evaluate_checkpoint(ctx, path, args.split, loaded)
    print(format_metrics_table(metrics))
    print(f"report: {write_report(run_dir)}")
    ctx.logger.close()
    return 0


def cmd_report(args) -> int:
    from dscl.report import write_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: no such run folder")
    print(write_report(run_dir))
    return 0


def cmd_config(args) -> int:
    from dscl.config import config_to_yaml

    print(config_to_yaml(resolve_config(args)), end="")
    return 0


def cmd_predict(args) -> int:
    from dscl.predict import predict_paths

    for path, top in predict_paths(Path(args.checkpoint), [Path(p) for p in args.paths], args.topk):
        ranked = ", ".join(f"{name} {prob:.3f}" for name, prob in top)
        print(f"{path}\t{ranked}")
    return 0


def cmd_export(args) -> int:
    from dscl.predict import export_backbone

    out = export_backbone(Path(args.checkpoint), Path(args.output))
    print(out)
    return 0


COMMANDS = {
    "pretrain": cmd_pretrain,
    "run": cmd_run,
    "classify": cmd_classify,
    "evaluate": cmd_evaluate,
    "report": cmd_report,
    "config": cmd_config,
    "predict": cmd_predict,
    "export": cmd_export,
    "study": cmd_study,
}

if __name__ == "__main__":
    sys.exit(main())
