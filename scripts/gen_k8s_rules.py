"""Embed the Prometheus rules file into the Prometheus Operator's PrometheusRule.

    python scripts/gen_k8s_rules.py

k8s/components/observability/rules.yaml is the source: promtool checks and
unit-tests it as a plain rules file. The PrometheusRule beside it carries the
same groups, copied as text (comments included) under ``spec:``. The output
depends only on rules.yaml, so a test regenerates it and compares byte for byte.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OBSERVABILITY = ROOT / "k8s" / "components" / "observability"
RULES = OBSERVABILITY / "rules.yaml"
PROMETHEUS_RULE = OBSERVABILITY / "prometheusrule.yaml"

HEADER = """\
# Generated from rules.yaml by scripts/gen_k8s_rules.py; edit rules.yaml and
# regenerate. The Prometheus Operator loads these groups into every
# Prometheus whose ruleSelector matches the labels below.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: dreamsight
  labels:
    app.kubernetes.io/name: dreamsight
    app.kubernetes.io/component: monitoring
spec:
"""


def prometheus_rule(rules_text: str) -> str:
    """The PrometheusRule manifest holding rules_text's groups."""
    lines = rules_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        raise ValueError("rules file has no top-level 'groups:' line") from None
    body = [f"  {line}" if line.strip() else "" for line in lines[start:]]
    return HEADER + "\n".join(body) + "\n"


def main() -> None:
    """Rewrite prometheusrule.yaml from rules.yaml."""
    PROMETHEUS_RULE.write_text(prometheus_rule(RULES.read_text()))


if __name__ == "__main__":
    main()
