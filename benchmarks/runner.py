"""Orchestration: the server, the data sets, each step's repeats, progress, and the report."""

from __future__ import annotations

import contextlib
import datetime
import itertools
import sys
import time
from collections.abc import Iterator

import redis

from asyncstreams import AsyncstreamsError

from . import env, report
from .config import Config
from .procs import ChildError
from .results import Outcome, describe
from .scenarios import Step, plan
from .steps import Run
from .store import Store
from .targets import evaluate


def say(text: str = "", *, end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


@contextlib.contextmanager
def server(config: Config) -> Iterator[tuple[str, str]]:
    """The Redis to use: `--url`, or a private redis-server on a free loopback port."""
    if config.url:
        yield config.url, "given with --url"
        return
    from asyncstreams.embedded import EmbeddedRedis

    with EmbeddedRedis() as embedded:
        yield embedded.url, f"embedded: {embedded.binary} on a free loopback port"


def run_case(steps: list[Step], store: Store) -> list[Outcome]:
    """The steps of one case (the rows of one table), their repeats in rounds: round r runs
    each step once, in an order rotated by r, so that a machine that drifts (a shared 2-core
    one does) weighs on every row alike and the ratios within the case stay fair."""
    outcomes = {step.key: Outcome(step, "ok") for step in steps}
    datasets = {}
    for step in steps:
        if step.skip:
            outcomes[step.key] = Outcome(step, "n/a", note=step.skip)
        elif step.data is not None:
            datasets[step.key] = store.dataset(*step.data)
    for round_ in range(max(step.repeat for step in steps)):
        turn = round_ % len(steps)
        for step in steps[turn:] + steps[:turn]:
            outcome = outcomes[step.key]
            if step.skip or outcome.status == "fail" or round_ >= step.repeat:
                continue
            try:
                run = step.run(store, datasets.get(step.key))
            except (ChildError, AsyncstreamsError, redis.RedisError, OSError) as exc:
                run = Run(problems=[str(exc)])
            outcome.runs.append(run)
            if run.problems:
                outcome.status, outcome.note = "fail", "; ".join(run.problems)
            elif run.behind:
                outcome.status, outcome.note = "behind", run.behind
            say(".", end="")
    return [outcomes[step.key] for step in steps]


def run_suite(config: Config) -> int:
    versions = env.package_versions()
    machine = env.machine()
    steps = plan(config)
    say(f"asyncstreams benchmarks: {env.command_line()}")
    versions["asyncstreams source"] = env.source()
    say("versions: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    say(f"machine: {machine['cpus']} CPUs, {machine['cpu_model']}, {machine['platform']}")
    say(f"results will be written to {config.out}")
    outcomes: list[Outcome] = []
    started_at = datetime.datetime.now().astimezone()
    started = time.perf_counter()
    with server(config) as (url, where):
        store = Store(url)
        versions["redis-server"] = store.server_version()
        say(f"redis-server {versions['redis-server']} ({where})")
        say(
            f"{len(steps)} steps, {config.repeat} repeat(s) each "
            "(latency, memory and the idle cluster consumer: 1)"
        )
        try:
            scenario = None
            for (name, case), group in itertools.groupby(steps, lambda s: (s.scenario, s.case)):
                if name != scenario:
                    store.drop_datasets()  # keep only one scenario's data in the server
                    scenario = name
                case_steps = list(group)
                say(f"{name} {case}: {len(case_steps)} rows, in rotating rounds ", end="")
                case_outcomes = run_case(case_steps, store)
                say()
                for outcome in case_outcomes:
                    outcomes.append(outcome)
                    say(f"[{len(outcomes)}/{len(steps)}] {outcome.step.title} {describe(outcome)}")
        finally:
            store.delete_all()
    elapsed = time.perf_counter() - started
    targets = evaluate(outcomes)
    paths = report.write(
        config,
        outcomes,
        targets,
        versions=versions,
        machine=machine,
        server=where,
        started_at=started_at,
        seconds=elapsed,
    )
    say(f"\ndone in {elapsed:.0f} s; wrote " + ", ".join(str(p) for p in paths))
    say("targets:")
    for target in targets:
        say(f"  {target.verdict:>7}  {target.name}: {target.measured}")
    failures = [o for o in outcomes if o.status == "fail"]
    if failures:
        say(f"\nFAILED: {len(failures)} step(s) gave wrong or no results:", end="\n")
        for outcome in failures:
            say(f"  {outcome.step.title}: {outcome.note}")
        return 1
    return 0
