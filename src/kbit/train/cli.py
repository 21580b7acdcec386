"""``kbit train [CONFIG.yaml] [--key value ...]``: flags override the file's keys; no CONFIG: the default job.

argparse only routes the subcommand here: TrainConfig's own parser reads the keys, so that every key works as
``--key value``, ``--key=value``, ``--some-key`` and ``--some_key``, booleans as ``--flag`` / ``--no-flag``,
and a misspelt key gets a did-you-mean. Configuration is checked before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .config import ConfigError, build_config, check_paths, help_text, parse_cli

USAGE = """usage: kbit train [CONFIG.yaml] [--key value ...] [--quick] [--print-config]

Fine-tune a causal LM with (Q)LoRA. Keys come from CONFIG.yaml ('key: value' lines) and from flags, which win:
--key value, --key=value, --max-steps or --max_steps; booleans also as --packing / --no-packing.
With no CONFIG it runs the embedded default job: SmolLM2-135M-Instruct in NF4 + double quant, LoRA r=16 on all
linear layers, on the built-in date-to-ISO task; it reports eval loss and task accuracy before and after and
writes the adapter, metrics.jsonl, loss_curve.png and summary.json to runs/<name>/.

  -h, --help        show this help
  --quick           the default job's short version (CI): fewer examples and eval prompts
  --print-config    print the resolved configuration as YAML and exit
  --resume [PATH]   continue from the newest complete checkpoint (of output_dir, else of the newest run)

keys, with their defaults:"""


class _PassThroughParser(argparse.ArgumentParser):
    """A subcommand parser that hands its arguments over untouched to :func:`run_train`."""

    def parse_known_args(self, args=None, namespace=None):
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.train_argv = list(args or [])
        namespace.func = run_train
        return namespace, []


def add_train_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``kbit train`` on the ``kbit`` command's subparsers."""
    parser = subparsers.add_parser(
        "train", add_help=False, help="fine-tune with QLoRA (no arguments: the embedded default job)"
    )
    parser.__class__ = _PassThroughParser  # add_parser has no class argument; the subclass adds no state
    return parser


add_parser = add_train_parser  # the name kbit.cli looks for in each command module


def run_train(args: argparse.Namespace) -> int:
    """Validate the configuration (fast, one line on error), then run the job; returns the exit status."""
    from . import default_job

    try:
        cli = parse_cli(args.train_argv)
        if cli.help:
            presets = {
                "with no CONFIG, the default job also sets": default_job.DEFAULT_JOB,
                "and --quick on top of it": default_job.QUICK,
            }
            print(USAGE + help_text(presets))
            return 0
        if cli.quick and cli.config_path is not None:
            raise ConfigError("--quick is the default job's short version; it takes no CONFIG file")
        preset = dict(default_job.DEFAULT_JOB) if cli.config_path is None else {}
        if cli.quick:
            preset.update(default_job.QUICK)
        config = build_config(cli.config_path, cli.overrides, preset)
        check_paths(config)
    except ConfigError as e:
        print(f"kbit train: error: {e}", file=sys.stderr)
        return 2
    if cli.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0

    from ..data import DataError
    from ..dist import RankOutOfMemoryError, StrategyError
    from .job import run_job
    from .loop import TrainingDiverged

    job = "default" if cli.config_path is None else Path(cli.config_path).stem
    try:
        summary = run_job(config, job=job)
    except (ConfigError, DataError, StrategyError, TrainingDiverged, RankOutOfMemoryError, FileNotFoundError) as e:
        print(f"kbit train: error: {e}", file=sys.stderr)
        return 1
    stopped = summary["stopped_by"]
    if stopped in ("SIGINT", "SIGTERM"):
        return 128 + signal.Signals[stopped].value  # the shell's convention for "ended by this signal"
    return 0
