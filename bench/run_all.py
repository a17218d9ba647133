"""`make bench`: run every benchmark of bench/, then write the report and its plots.

    .venv/bin/python -m bench.run_all [--quick] [--only api,store] [--docs docs/performance.md]

Each `bench/bench_<name>.py` runs in a child process of its own (this same module with
`--child`), which imports it and calls its `run(quick)`; the child's output goes to
`bench/results/logs/<name>.log`, so that a progress bar on stderr shows what is running.
A module that is missing, fails or overruns its time limit is recorded as such and the
next one runs. The results go to `bench/results/latest.json`, `latest.md`, and the plots
`throughput.png` and `latency.png` (each figure beside its baseline). The result shape a
module returns is described in bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib
import inspect
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["main", "normalize"]

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
MODULES = (
    "store",
    "mqtt",
    "mqtt_endpoint",
    "amqp",
    "coap",
    "opcua",
    "api",
    "alarms",
    "partitions",
    "commands",
    "console",
)
# A module should take about 2 minutes; past this it is stopped and reported as timed out.
DEFAULT_TIMEOUT_S = 180.0
# The API load test seeds 10 million points first (about a minute, more on a busy machine).
# MQTT and AMQP measure the default configuration, OPC UA off and 1 and 2 ingest workers.
TIMEOUTS_S = {
    "api": 240.0,
    "mqtt": 300.0,
    "mqtt_endpoint": 360.0,
    "amqp": 300.0,
    "commands": 300.0,
    "partitions": 240.0,
    "console": 300.0,
}
# `make bench` must finish within 15 minutes: modules that would start past this budget
# are skipped (and reported), and a module's time limit never reaches past it.
DEFAULT_BUDGET_S = 14 * 60.0
STOP_GRACE_S = 30.0  # after SIGTERM, before SIGKILL: time to stop servers, drop databases
DOCS_START = "<!-- bench-report:start -->"
DOCS_END = "<!-- bench-report:end -->"
# exit codes of the child process
EXIT_OK, EXIT_FAILED, EXIT_MISSING = 0, 1, 3


# --- child: run one module --------------------------------------------------------------


def _call_run(module: Any, quick: bool) -> Any:
    """Call `module.run`, tolerating `async def run` and a run() without a `quick` argument."""
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"{module.__name__} has no run(quick) function")
    parameters = inspect.signature(run).parameters
    if "quick" in parameters:
        result = run(quick=quick)
    elif all(p.default is not inspect.Parameter.empty for p in parameters.values()):
        result = run()
    else:
        raise TypeError(
            f"{module.__name__}.run{inspect.signature(run)} cannot be called as run(quick): "
            "see bench/README.md"
        )
    if inspect.isawaitable(result):
        result = asyncio.run(_awaited(result))
    return result


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def _child(name: str, quick: bool, result_file: Path) -> int:
    """Import bench_<name>, run it and write its raw result (or error) as JSON."""
    module_name = f"bench.bench_{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name in (module_name, "bench"):
            result_file.write_text(json.dumps({"error": f"{module_name} does not exist"}))
            return EXIT_MISSING
        raise
    try:
        result = _call_run(module, quick)
    # Any failure of a benchmark must be recorded, whatever its type: the runner goes on.
    except BaseException as exc:
        traceback.print_exc()
        result_file.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return EXIT_FAILED
    result_file.write_text(json.dumps({"result": result}, default=str))
    return EXIT_OK


# --- normalising what a module returned -------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _kind(unit: str, given: Any) -> str:
    if given in ("throughput", "latency"):
        return str(given)
    unit = unit.strip().lower()
    if unit.endswith("/s") or unit.endswith("ps"):
        return "throughput"
    if unit in ("ms", "us", "µs", "s", "ns"):
        return "latency"
    return "other"


def _figure(raw: dict[str, Any]) -> dict[str, Any]:
    value = _number(raw.get("value"))
    baseline = _number(raw.get("baseline_value"))
    ratio = _number(raw.get("ratio"))
    if ratio is None and value is not None and baseline:
        ratio = round(value / baseline, 3)
    unit = str(raw.get("unit", ""))
    return {
        "label": str(raw.get("label", "?")),
        "value": value,
        "unit": unit,
        "baseline_label": str(raw.get("baseline_label") or ""),
        "baseline_value": baseline,
        "ratio": ratio,
        "kind": _kind(unit, raw.get("kind")),
    }


def _unit_from_key(key: str) -> str:
    key = key.lower()
    for suffix, unit in (
        ("_per_s", "/s"), ("_ps", "/s"), ("rps", "req/s"), ("_ms", "ms"), ("_us", "us"),
        ("_s", "s"), ("seconds", "s"),
    ):  # fmt: skip
        if key.endswith(suffix):
            return unit
    return ""


def _leaves(value: Any, path: str) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{path}.{key}" if path else str(key))
    elif (number := _number(value)) is not None:
        yield path, number


def normalize(name: str, raw: Any) -> dict[str, Any]:
    """A module's result in the documented shape (bench/README.md), whatever it returned."""
    notes: list[str] = []
    if not isinstance(raw, dict):
        return {
            "name": name,
            "figures": [],
            "notes": [f"run() returned {type(raw).__name__}, not a dict: nothing to report"],
        }
    given_notes = raw.get("notes")
    if isinstance(given_notes, str):
        notes.append(given_notes)
    elif isinstance(given_notes, list):
        notes.extend(str(n) for n in given_notes)
    figures_in = raw.get("figures")
    if isinstance(figures_in, list) and all(
        isinstance(f, dict) and "value" in f for f in figures_in
    ):
        figures = [_figure(f) for f in figures_in]
    else:
        # Not the documented shape: still show every number it returned, without baselines.
        figures = [
            _figure({"label": path, "value": number, "unit": _unit_from_key(path)})
            for path, number in _leaves(raw, "")
        ]
        notes.append(
            "result not in the documented shape (bench/README.md): every number is listed, "
            "without baselines"
        )
    return {"name": str(raw.get("name") or name), "figures": figures, "notes": notes}


# --- parent: run every module with a progress bar ---------------------------------------


@dataclass(slots=True)
class Outcome:
    """What happened to one module."""

    name: str
    status: str  # ok | failed | missing | timeout | skipped
    seconds: float
    load_before: float  # 1-minute load average when it started: other work on the machine
    error: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    raw: Any = None


class _Progress:
    """tqdm when installed, else one line per step on stderr."""

    def __init__(self, total: int) -> None:
        self._bar: Any = None
        try:
            from tqdm import tqdm  # type: ignore[import-untyped, unused-ignore]
        except ImportError:
            self._done = 0
            self._total = total
        else:
            self._bar = tqdm(
                total=total,
                unit="bench",
                file=sys.stderr,
                dynamic_ncols=True,
                bar_format="{n_fmt}/{total_fmt} |{bar:20}| {elapsed} {desc}",
            )

    def status(self, name: str, text: str) -> None:
        """Show what is running now."""
        if self._bar is not None:
            self._bar.set_description_str(f"{name}: {text}"[:90], refresh=True)

    def done(self, outcome: Outcome) -> None:
        """One module finished."""
        line = f"{outcome.name}: {outcome.status} in {outcome.seconds:.0f} s"
        if outcome.error:
            line += f" ({outcome.error[:100]})"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
            self._bar.update(1)
        else:
            self._done += 1
            print(f"[{self._done}/{self._total}] {line}", file=sys.stderr, flush=True)

    def close(self) -> None:
        """Finish the bar."""
        if self._bar is not None:
            self._bar.close()


def _last_line(log: Path) -> str:
    with contextlib.suppress(OSError):
        with log.open("rb") as handle:
            handle.seek(max(0, log.stat().st_size - 2000))
            lines = [line.strip() for line in handle.read().decode(errors="replace").splitlines()]
        lines = [line for line in lines if line]
        if lines:
            return lines[-1]
    return ""


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the module may clean up), then SIGKILL its whole process group."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_module(name: str, quick: bool, timeout_s: float, progress: _Progress) -> Outcome:
    logs = RESULTS / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{name}.log"
    result_file = logs / f"{name}.result.json"
    result_file.unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    args = [
        sys.executable,
        "-m",
        "bench.run_all",
        "--child",
        name,
        "--result-file",
        str(result_file),
    ]
    if quick:
        args.append("--quick")
    started = time.monotonic()
    progress.status(name, "starting")
    with log.open("wb") as out:
        # Its own session: a timeout can stop the child and everything it started.
        proc = subprocess.Popen(
            args, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    timed_out = False
    try:
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if elapsed > timeout_s:
                timed_out = True
                progress.status(name, "time limit reached: stopping")
                _stop(proc)
                break
            progress.status(name, f"{elapsed:4.0f} s  {_last_line(log)}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
    except KeyboardInterrupt:
        _stop(proc)
        raise
    seconds = time.monotonic() - started
    document: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        document = json.loads(result_file.read_text())
    if timed_out:
        return Outcome(
            name, "timeout", seconds, load_before,
            f"stopped after {timeout_s:.0f} s (log: {log.relative_to(REPO)})",
        )  # fmt: skip
    if proc.returncode == EXIT_MISSING:
        return Outcome(name, "missing", seconds, load_before, document.get("error", ""))
    if proc.returncode != EXIT_OK or "result" not in document:
        error = document.get("error") or f"exit code {proc.returncode}: {_last_line(log)}"
        return Outcome(
            name, "failed", seconds, load_before, f"{error} (log: {log.relative_to(REPO)})"
        )
    raw = document["result"]
    return Outcome(name, "ok", seconds, load_before, "", normalize(name, raw), raw)


# --- report ------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()} {platform.machine()}",
    }


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table of every figure beside its baseline, then notes."""
    machine = report["machine"]
    lines = [
        f"Run of {report['started_at']} ({'quick' if report['quick'] else 'full'}), "
        f"{report['duration_s'] / 60:.1f} min in all, on {machine['cpus']} CPUs, "
        f"Python {machine['python']}, {machine['system']}.",
        "",
        "| benchmark | figure | value | unit | baseline (same run) | baseline value | ratio |",
        "| --- | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for bench in report["benchmarks"]:
        figures = bench["result"].get("figures", []) if bench["status"] == "ok" else []
        if not figures:
            lines.append(
                f"| {bench['name']} | *{bench['status']}*: {_cell(bench['error'] or 'no figure')}"
                " | | | | | |"
            )
        for f in figures:
            lines.append(
                f"| {bench['name']} | {_cell(f['label'])} | {_fmt(f['value'])} | {f['unit']} | "
                f"{_cell(f['baseline_label'])} | {_fmt(f['baseline_value'])} | "
                f"{_fmt(f['ratio'])} |"
            )
    lines += [
        "",
        "| benchmark | status | seconds | load average at start |",
        "| --- | --- | ---: | ---: |",
    ]
    for bench in report["benchmarks"]:
        lines.append(
            f"| {bench['name']} | {bench['status']} | {bench['seconds']:.0f} | "
            f"{bench['load_before']:.2f} |"
        )
    notes = [
        (bench["name"], note)
        for bench in report["benchmarks"]
        for note in bench["result"].get("notes", [])
    ]
    if notes:
        lines += ["", "Notes:", ""]
        lines += [f"- **{name}**: {note}" for name, note in notes]
    if report.get("plots_error"):
        lines += ["", f"Plots not drawn: {report['plots_error']}"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], directory: Path) -> list[Path]:
    """throughput.png and latency.png: each figure (colour) beside its baseline (grey)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    written: list[Path] = []
    for kind, title in (
        ("throughput", "Throughput by benchmark (higher is better)"),
        ("latency", "Latency by benchmark (lower is better)"),
    ):
        rows = [
            (bench["name"], f)
            for bench in report["benchmarks"]
            if bench["status"] == "ok"
            for f in bench["result"]["figures"]
            if f["kind"] == kind and f["value"] is not None
        ]
        path = directory / f"{kind}.png"
        fig, ax = plt.subplots(figsize=(11, max(2.5, 0.75 * len(rows) + 1.5)))
        if not rows:
            ax.text(0.5, 0.5, f"no {kind} figure in this run", ha="center", va="center")
            ax.set_axis_off()
        else:
            names = sorted({name for name, _ in rows})
            colours = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
            height = 0.38
            labels = []
            for i, (name, f) in enumerate(rows):
                y = len(rows) - 1 - i
                ax.barh(y + height / 2, f["value"], height, color=colours[name])
                if f["baseline_value"] is not None:
                    ax.barh(y - height / 2, f["baseline_value"], height, color="0.7")
                    ax.text(
                        f["baseline_value"], y - height / 2,
                        f"  {_fmt(f['baseline_value'])} {f['unit']}  ({f['baseline_label']})",
                        va="center", fontsize=7, color="0.35",
                    )  # fmt: skip
                ratio = f" (x{_fmt(f['ratio'])} of baseline)" if f["ratio"] is not None else ""
                ax.text(
                    f["value"], y + height / 2, f"  {_fmt(f['value'])} {f['unit']}{ratio}",
                    va="center", fontsize=7,
                )  # fmt: skip
                labels.append((y, f"{name}: {f['label']}"))
            ax.set_yticks([y for y, _ in labels], [text[:48] for _, text in labels], fontsize=8)
            positive = [f["value"] for _, f in rows if f["value"] and f["value"] > 0]
            positive += [f["baseline_value"] for _, f in rows if f["baseline_value"]]
            if positive and max(positive) / max(min(positive), 1e-9) > 50:
                ax.set_xscale("log")  # units and magnitudes differ between protocols
            ax.set_xlim(right=ax.get_xlim()[1] * (8 if ax.get_xscale() == "log" else 1.5))
            ax.set_xlabel("value (unit beside each bar); grey: baseline measured in the same run")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def update_docs(doc: Path, text: str) -> None:
    """Replace the example report between the markers in `doc` with `text`."""
    content = doc.read_text()
    if DOCS_START not in content or DOCS_END not in content:
        raise SystemExit(f"{doc}: markers {DOCS_START} / {DOCS_END} not found")
    head, rest = content.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    doc.write_text(f"{head}{DOCS_START}\n{text}{DOCS_END}{tail}")


def run_all(
    names: list[str], quick: bool, timeout_s: float | None, budget_s: float = DEFAULT_BUDGET_S
) -> dict[str, Any]:
    """Run the modules one after the other and return the report (also written to disk).

    `timeout_s` None: each module's own limit (`TIMEOUTS_S`, else `DEFAULT_TIMEOUT_S`).
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now(dt.UTC).replace(microsecond=0)
    started = time.monotonic()
    progress = _Progress(len(names))
    outcomes: list[Outcome] = []
    try:
        for name in names:
            left = budget_s - (time.monotonic() - started)
            limit = timeout_s if timeout_s is not None else TIMEOUTS_S.get(name, DEFAULT_TIMEOUT_S)
            if left < 30:
                outcome = Outcome(
                    name, "skipped", 0.0, os.getloadavg()[0],
                    f"the time budget of {budget_s / 60:.0f} min was used up (--budget)",
                )  # fmt: skip
            else:
                outcome = _run_module(name, quick, min(limit, left), progress)
            outcomes.append(outcome)
            progress.done(outcome)
    finally:
        progress.close()
    report: dict[str, Any] = {
        "started_at": started_at.isoformat(),
        "quick": quick,
        "duration_s": round(time.monotonic() - started, 1),
        "machine": _machine(),
        "benchmarks": [
            {
                "name": o.name,
                "status": o.status,
                "seconds": round(o.seconds, 1),
                "load_before": round(o.load_before, 2),
                "error": o.error,
                "result": o.result,
                "raw": o.raw,
            }
            for o in outcomes
        ],
    }
    try:
        plot(report, RESULTS)
    except ImportError as exc:
        report["plots_error"] = f"{exc} (pip install the `bench` extra)"
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (RESULTS / "latest.md").write_text(markdown(report))
    return report


def main(argv: list[str] | None = None) -> int:
    """Command line of `make bench`; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(MODULES)}")
    parser.add_argument(
        "--timeout",
        type=float,
        help=f"seconds per module (default {DEFAULT_TIMEOUT_S:.0f}, api {TIMEOUTS_S['api']:.0f})",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET_S,
        help=f"seconds for the whole run (default {DEFAULT_BUDGET_S:.0f}); later modules skip",
    )
    parser.add_argument(
        "--docs", type=Path, help="also put the report into this file between its markers"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.quick, args.result_file)
    names = list(MODULES)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(names) - set(MODULES))
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(MODULES)}")
    report = run_all(names, args.quick, args.timeout, args.budget)
    text = markdown(report)
    print(text)
    print(f"written: {RESULTS.relative_to(REPO)}/latest.json, latest.md, throughput.png, "
          "latency.png", file=sys.stderr)  # fmt: skip
    if args.docs:
        update_docs(args.docs, text)
    # Benchmarks that could not run are in the report; the exit code says whether all ran.
    return 0 if all(b["status"] == "ok" for b in report["benchmarks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
