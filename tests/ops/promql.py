"""Metric names in PromQL expressions and in a Prometheus text exposition (test helpers).

A regex reading, not a parser: enough for the expressions our dashboard and rules use, and
checked against tricky cases in test_promql_names.py. The full parse is promtool's
(:func:`promtool_parse_errors`).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import yaml

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
# Label lists after grouping modifiers: `by (a, b)`, `on (x)`, `group_left (y)`, ...
_GROUPING = re.compile(
    r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])")
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "inf",
    "nan",
    "atan2",
}
# Grafana's macros and template variables, replaced by values PromQL accepts.
_GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
}
_TEMPLATE_VAR = re.compile(r"\$\{?\w+\}?")

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def substitute_grafana(expr: str) -> str:
    """Grafana macros to durations, template variables to a plain value."""
    for var, value in _GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return _TEMPLATE_VAR.sub("x", expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords and label names excluded)."""
    text = _STRING.sub('""', substitute_grafana(expr))
    text = _SELECTOR.sub("{}", text)
    text = _RANGE.sub("[]", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for m in _IDENT.finditer(text):
        name = m.group(1)
        following = text[m.end() :].lstrip()
        if following.startswith("(") or name.lower() in _KEYWORDS:
            continue  # a function or aggregation call, or an operator keyword
        # `sum by (x) (...)` leaves `sum` followed by `(` once the grouping is gone; a name
        # like `sum` followed by `without` is an aggregation too.
        names.add(name)
    # `{__name__="x"}` selects by name too.
    names |= set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    return names


_NAMED_SELECTOR = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def selector_labels(expr: str) -> dict[str, set[str]]:
    """Label names each metric's selector matches on (``m{a="x", b=~"y"}`` -> ``{m: {a, b}}``)."""
    text = _STRING.sub('""', substitute_grafana(expr))
    out: dict[str, set[str]] = {}
    for m in _NAMED_SELECTOR.finditer(text):
        out.setdefault(m.group(1), set()).update(_MATCHER.findall(m.group(2)))
    return out


def grouping_labels(expr: str) -> set[str]:
    """Label names in ``by``/``without``/``on``/``ignoring``/``group_*`` lists."""
    text = _STRING.sub('""', substitute_grafana(expr))
    names: set[str] = set()
    for m in _GROUPING.finditer(text):
        inner = m.group(0)[m.group(0).index("(") + 1 : -1]
        names.update(n.strip() for n in inner.split(",") if n.strip())
    return names


def exported_labels(exposition: str) -> dict[str, set[str]]:
    """Series name -> every label name its samples carry."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def exported_names(exposition: str) -> set[str]:
    """Every series name a text exposition offers: its samples, and the names its TYPE lines
    promise (a histogram's _bucket/_sum/_count, a counter's own name) even before a sample."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            if kind == "histogram":
                names |= {name + s for s in HISTOGRAM_SUFFIXES}
            elif kind == "summary":
                names |= {name, name + "_sum", name + "_count"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{\s]", line, maxsplit=1)[0])
    return names


def recorded_names(rules_file: Path) -> set[str]:
    """Names of the recording rules in a Prometheus rules file."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def rule_exprs(rules_file: Path) -> dict[str, str]:
    """Rule name (record or alert) -> expression."""
    groups = yaml.safe_load(rules_file.read_text())["groups"]
    return {r.get("record") or r["alert"]: r["expr"] for g in groups for r in g["rules"]}


def promtool_parse_errors(exprs: Iterable[str], workdir: Path) -> str | None:
    """Parse expressions offline with promtool (as recording rules; `promtool promql` does not
    exist in 2.42). Returns promtool's complaint, or None when every expression parses."""
    exe = shutil.which("promtool")
    assert exe is not None, "promtool is not installed: apt-get install -y prometheus"
    rules = [
        {"record": f"check:expr_{i}", "expr": substitute_grafana(e)} for i, e in enumerate(exprs)
    ]
    path = workdir / "exprs.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "exprs", "rules": rules}]}))
    result = subprocess.run(
        [exe, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    return None if result.returncode == 0 else result.stdout + result.stderr
