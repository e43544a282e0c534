"""Orchestration: the server, the data sets, each step's repeats, progress, and the report."""

from __future__ import annotations

import contextlib
import datetime
import sys
import time
from collections.abc import Iterator

import redis

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


def run_step(step: Step, store: Store) -> Outcome:
    if step.skip:
        return Outcome(step, "n/a", note=step.skip)
    dataset = None
    if step.data is not None:
        entries, size = step.data
        dataset = store.dataset(entries, size)
    outcome = Outcome(step, "ok")
    for _ in range(step.repeat):
        try:
            run = step.run(store, dataset)
        except (ChildError, redis.RedisError, OSError) as exc:
            run = Run(problems=[str(exc)])
        outcome.runs.append(run)
        if run.problems:
            outcome.status, outcome.note = "fail", "; ".join(run.problems)
            break
        if run.behind:
            outcome.status, outcome.note = "behind", run.behind
        say(".", end="")
    return outcome


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
        say(f"{len(steps)} steps, {config.repeat} repeat(s) each (latency and memory: 1)")
        try:
            scenario = None
            for index, step in enumerate(steps, 1):
                if step.scenario != scenario:
                    store.drop_datasets()  # keep only one scenario's data in the server
                    scenario = step.scenario
                say(f"[{index}/{len(steps)}] {step.title} ..", end="")
                outcome = run_step(step, store)
                outcomes.append(outcome)
                say(" " + describe(outcome))
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
