"""One Prometheus page for the whole deployment: every replica's page, each series labelled
with its `replica`.

Each replica renders its own ServerMetrics (the single server's families: vLLM's request and
engine series, loraplex's per-adapter ones); the ingress merges them family by family, so
`sum by (lora_name) (loraplex:lora_loads_total)` works across replicas and `by (replica)`
splits them.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def merge_pages(pages: dict[str, str]) -> str:
    """The families of every page (`replica id -> Prometheus text`), a `replica` label on each sample."""
    families: dict[str, tuple[str, str, list[str]]] = {}  # name -> (type, help, sample lines)
    for replica, page in sorted(pages.items()):
        for family in text_string_to_metric_families(page):
            _, _, lines = families.setdefault(family.name, (family.type, family.documentation, []))
            for sample in family.samples:
                labels = {**sample.labels, "replica": replica}
                rendered = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
                lines.append(f"{sample.name}{{{rendered}}} {_number(sample.value)}")
    out = []
    for name, (kind, documentation, lines) in families.items():
        out.append(f"# HELP {name} {_escape_help(documentation)}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    return "\n".join(out) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    return repr(float(value))
