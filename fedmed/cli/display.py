"""What the commands print: summaries and tables (shared by every command)."""

from __future__ import annotations

import argparse
import math
import sys

from fedmed.config import RunConfig, load_run_config, resolve_config_path


def _shown(task: str) -> list[str]:
    from fedmed.tasks import get_task

    return [m for m in SHOWN if m in get_task(task).metrics]


def _load(args: argparse.Namespace) -> RunConfig:
    cfg = load_run_config(resolve_config_path(args.config), args.overrides)
    changes = {}
    if getattr(args, "mode", None):
        changes["mode"] = args.mode
    if getattr(args, "output_dir", None):
        changes["output_dir"] = args.output_dir
    return cfg.replace(**changes) if changes else cfg


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value.is_integer() and value > 1:
        return str(int(value))
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _print_summary(payload: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    final = payload["final"]
    table = Table(title=f"{payload['name']} · {payload['mode']} · round {final['round']}")
    # Survival's time-dependent metrics (data.schema.horizons), when the study asked for them.
    timed = [k for k in final["average"] if k.startswith("auc@") or k == "ibs"]
    cols = [*_shown(payload["config"]["task"]), *timed, "num-examples", "epsilon"]
    table.add_column("site")
    for c in cols:
        table.add_column(c, justify="right")
    order = payload.get("sites") or list(final["sites"])
    for site in order:
        m = final["sites"].get(site)
        if m is None:
            continue
        table.add_row(site, *[_fmt(m.get(c)) for c in cols])
    avg = final["average"]
    table.add_row(
        "[bold]average[/bold]",
        *[_fmt(avg.get(c)) if c not in ("num-examples", "epsilon") else "" for c in cols],
    )
    Console(file=sys.stdout, width=120).print(table)
    for line in _coverage_lines(final.get("average_coverage"), [c for c in cols if c in avg]):
        print(line)
    if final.get("personalized"):
        _print_personalized(
            final["personalized"],
            order,
            payload["config"]["personalize"],
            [*_shown(payload["config"]["task"])[:3], "loss"],
        )
    if final.get("central_epsilon") is not None:
        privacy = payload["config"]["privacy"]
        print(
            f"central DP ({privacy['central']} clipping): site-level ε = "
            f"{final['central_epsilon']:.3f} at δ = {privacy['delta']:g}"
        )
    failures = [f for h in payload["history"] for f in h["failures"]]
    if failures:
        rounds_by_reason: dict[str, list[int]] = {}
        for h in payload["history"]:
            for f in h["failures"]:
                rounds_by_reason.setdefault(f"{f['phase']}: {f['reason']}", []).append(h["round"])
        for reason, rounds in rounds_by_reason.items():
            print(f"failed or refused in round(s) {','.join(map(str, rounds))} — {reason}")
    if final.get("missing_sites"):
        print(f"sites without results in the last round: {', '.join(final['missing_sites'])}")
    for site, why in payload.get("failed_models", {}).items():
        print(f"no model released for {site}: {why} (its final metrics are n/a)")


def _coverage_lines(coverage: dict | None, shown: list[str]) -> list[str]:
    """One line per group of shown metrics whose average leaves sites out: 'average of N/M'.

    Without it a mean over 2 of 3 sites reads like a mean over all 3. Metrics missing the same
    sites share a line; long site lists are cut so the line stays one line.
    """
    if not coverage:
        return []
    groups: dict[tuple[str, ...], list[str]] = {}
    for metric in shown:
        gaps = tuple(coverage["missing"].get(metric, ()))
        if gaps:
            groups.setdefault(gaps, []).append(metric)
    total = coverage["sites"]
    lines = []
    for gaps, metrics in groups.items():
        names = ", ".join(gaps[:5]) + (f" and {len(gaps) - 5} more" if len(gaps) > 5 else "")
        lines.append(
            f"{', '.join(metrics)}: average of {total - len(gaps)}/{total} sites "
            f"(no value from {names})"
        )
    return lines


def _print_personalized(
    personalized: dict, order: list[str], settings: dict, cols: list[str]
) -> None:
    """Per-site test metrics of the final global model before -> after local fine-tuning."""
    from rich.console import Console
    from rich.table import Table

    how = [f"{settings['local_epochs']:g} local epoch(s) per site"] * bool(settings["local_epochs"])
    how += ["own normalization layers"] * bool(settings.get("local_normalization"))
    table = Table(title=f"personalized: {' + '.join(how)} (before → after)")
    table.add_column("site")
    for c in cols:
        table.add_column(c, justify="right")
    rows = [(s, personalized["sites"][s]) for s in order if s in personalized["sites"]]
    for label, m in [*rows, ("[bold]average[/bold]", personalized["average"])]:
        table.add_row(
            label, *[f"{_fmt(m['before'].get(c))} → {_fmt(m['after'].get(c))}" for c in cols]
        )
    Console(file=sys.stdout, width=120).print(table)


# Metrics shown in the progress bar and the summary table, in this order, when the task has them.
SHOWN = {"accuracy": "acc", "macro_f1": "macro-F1", "roc_auc": "auc", "f1": "f1",
         "precision": "prec", "recall": "rec", "c_index": "C-index"}  # fmt: skip


class _Progress:
    """A rich progress bar on stderr with the running average metrics and the worst ε."""

    def __init__(self, cfg: RunConfig) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        label = f"{cfg.name} ({cfg.mode}, {len(cfg.sites)} sites)"
        self.task = self.progress.add_task(label, total=cfg.rounds, info="")
        self.shown = _shown(cfg.task)[:2]

    def update(self, rnd: int, history) -> None:
        avg = history.average(rnd)
        parts = [f"{SHOWN[m]} {avg.get(m, math.nan):.3f}" for m in self.shown]
        eps = history.epsilon(rnd)
        if any(eps.values()):
            parts.append(f"ε≤{max(eps.values()):.2f}")
        failed = {f["site"] for f in history.failures.get(rnd, [])}
        if failed:
            parts.append(f"[red]failed: {', '.join(sorted(failed))}[/red]")
        self.progress.update(self.task, completed=rnd, info=" · ".join(parts))

    def close(self) -> None:
        self.progress.stop()


def _print_stats(stats: dict) -> None:
    """Cohort and outcome per site and pooled; the rest is in stats.md."""
    from rich.console import Console
    from rich.table import Table

    outcome = stats["outcome"]
    table = Table(title=f"federated statistics · {stats['study']} (min cell {stats['min_cell']})")
    for col in ("site", "cohort", *(f"outcome {x}" for x in outcome["labels"]), "rate", "ε"):
        table.add_column(col, justify="left" if col == "site" else "right")

    def cell(value: object) -> str:
        return "·" if value is None else _fmt(value)

    secure = "secure_aggregation" in stats
    if secure:  # SecAgg+: no site's counts are known, only the ε each spent
        for site, spent in stats["epsilon"].items():
            table.add_row(site, *["masked"] * (len(outcome["labels"]) + 2), _fmt(spent))
    else:
        for site in stats["sites"]:
            table.add_row(
                site,
                cell(stats["cohort"]["sites"][site]),
                *map(cell, outcome["sites"][site]),
                cell(outcome["rate"]["sites"][site]),
                _fmt(stats["epsilon"][site]),
            )

    def pooled(c: dict) -> str:
        if secure and c["partial"]:
            return "·"
        return ("≥" if c["partial"] else "") + str(c["count"])

    table.add_row(
        "pooled",
        *map(pooled, [stats["cohort"]["pooled"], *outcome["pooled"]]),
        cell(outcome["rate"]["pooled"]) + ("*" if outcome["rate"]["pooled_partial"] else ""),
        "",
    )
    Console(file=sys.stderr, width=120).print(table)
    note = (
        "masked = summed under SecAgg+; · = a pooled count below the minimum"
        if secure
        else "· = suppressed at the site; ≥ = a pooled count some site suppressed part of; "
        "* = a rate over the sites that published it"
    )
    print(note, file=sys.stderr)
