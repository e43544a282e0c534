"""`python -m benchmarks [--quick] [--scenarios drain,io,...] [--entries N] [--repeat N]
[--url URL] [--out DIR]`: run the suite and write benchmarks/results/latest.{json,md,png}
(with --quick, benchmarks/results/quick/latest.*)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from .config import (
    ALL_SCENARIOS,
    DEFAULT_SCENARIOS,
    QUICK_RESULTS_DIR,
    RESULTS_DIR,
    Config,
    quick_config,
)


def _positive(text: str) -> int:
    try:
        value = int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {text!r}")
    return value


def _scenarios(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ALL_SCENARIOS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown scenario(s) {', '.join(unknown) or '(none)'}; "
            f"expected a comma-separated list of {', '.join(ALL_SCENARIOS)}"
        )
    return names


def _rates(text: str) -> tuple[int, ...]:
    return tuple(_positive(part) for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark asyncstreams against a hand-written redis-py consumer and "
        "FastStream, on a private redis-server (or --url), and write JSON, Markdown and a chart.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, one repeat, 0.5 s latency runs: a smoke check in under a minute; "
        f"writes to {QUICK_RESULTS_DIR} unless --out says otherwise",
    )
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        metavar="LIST",
        help=f"comma-separated, of {','.join(ALL_SCENARIOS)} "
        f"(default: {','.join(DEFAULT_SCENARIOS)}; memory is opt-in)",
    )
    parser.add_argument(
        "--entries", type=_positive, metavar="N", help="backlog of the drain and workers scenarios"
    )
    parser.add_argument("--repeat", type=_positive, metavar="N", help="runs per step (default 3)")
    parser.add_argument(
        "--url",
        help="a Redis to use instead of a private one (its keys are left alone: the suite "
        "writes and deletes only its own asyncstreams-bench:* keys)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"where to write results (default {RESULTS_DIR}; with --quick, {QUICK_RESULTS_DIR})",
    )
    parser.add_argument(
        "--rates", type=_rates, metavar="LIST", help="latency rates in msgs/s (default 2000,20000)"
    )
    parser.add_argument(
        "--latency-seconds", type=float, metavar="S", help="length of each latency run"
    )
    parser.add_argument(
        "--memory-entries", type=_positive, metavar="N", help="backlog of the memory scenario"
    )
    parser.add_argument(
        "--cluster-entries", type=_positive, metavar="N", help="backlog of the cluster scenario"
    )
    parser.add_argument(
        "--baseline-source",
        type=_source,
        metavar="DIR",
        help="a folder holding another asyncstreams package (a checkout of an earlier "
        "commit, say): the drain scenario runs it too, beside this one, for a before/after",
    )
    return parser


def _source(text: str) -> Path:
    folder = Path(text).resolve()
    if not (folder / "asyncstreams" / "__init__.py").is_file():
        raise argparse.ArgumentTypeError(
            f"expected a folder with an asyncstreams package in it, found none in {folder}"
        )
    return folder


def config_from(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    if args.scenarios:
        overrides["scenarios"] = args.scenarios
    if args.entries:
        overrides["drain_entries"] = args.entries
    if args.repeat:
        overrides["repeat"] = args.repeat
    if args.url:
        overrides["url"] = args.url
    if args.out:
        overrides["out"] = args.out
    if args.rates:
        overrides["latency_rates"] = args.rates
    if args.latency_seconds:
        overrides["latency_seconds"] = args.latency_seconds
    if args.memory_entries:
        overrides["memory_entries"] = args.memory_entries
    if args.cluster_entries:
        overrides["cluster_entries"] = args.cluster_entries
    if args.baseline_source:
        overrides["baseline_source"] = args.baseline_source
    if args.quick:
        return quick_config(**overrides)
    return Config(**overrides)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .runner import run_suite

    try:
        return run_suite(config_from(args))
    except KeyboardInterrupt:
        print(
            "\ninterrupted; child processes and the suite's keys were cleaned up", file=sys.stderr
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
