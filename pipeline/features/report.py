"""A static, offline HTML page of features: frequency, explanation, top contexts with the token marked.

Every piece of text from the corpus or the LLM is HTML-escaped; the page has no scripts and no
external resources, so it opens from disk anywhere.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from bae.common.atomic_files import atomic_write_text

REPORT_HTML = "report.html"

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; color: #222; }
table.summary td { padding: 0 1em 0 0; }
section { border-top: 1px solid #ccc; padding: 0.5em 0; }
h2 { font-size: 1.05em; margin: 0.3em 0; }
.meta { color: #555; font-size: 0.9em; }
.explanation { font-style: italic; }
ol { margin: 0.3em 0; }
li { margin: 0.15em 0; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.score { color: #777; font-size: 0.8em; margin-right: 0.6em; }
mark { background: #ffd54f; padding: 0 1px; }
mark.off { background: #90caf9; }
.yes { color: #2e7d32; } .no { color: #c62828; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _context(sample: dict[str, Any]) -> str:
    off = ' class="off" title="bit off (its rarer state)"' if sample.get("bit") == 0 else ""
    return (
        f'<li><span class="score">{sample["score"]:.4g}</span><span class="ctx">{_e(sample["before"])}'
        f"<mark{off}>{_e(sample['token'])}</mark>{_e(sample['after'])}</span>"
        f' <span class="meta">doc {sample["doc"]} pos {sample["position"]}</span></li>'
    )


def _feature(record: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    j = record["feature"]
    meta = [f"frequency {record['frequency']:.4g}"]
    if "oriented_frequency" in record:
        meta.append(f"oriented {record['oriented_frequency']:.4g}")
    meta.append(f"assigned tokens {record['assigned']}")
    lines = [f'<section id="f{j}"><h2>Feature {j}</h2><div class="meta">{_e(" · ".join(meta))}</div>']
    if verdict is not None:
        if verdict.get("explanation"):
            mark = "yes" if verdict["interpretable"] else "no"
            lines.append(
                f'<div>explanation: <span class="explanation">{_e(verdict["explanation"])}</span> '
                f'<span class="{mark}">score {verdict["score"]:.2f}'
                f"{' (interpretable)' if verdict['interpretable'] else ''}</span></div>"
            )
        else:
            lines.append(f'<div class="meta">not interpreted: {_e(verdict.get("reason", ""))}</div>')
    if record["contexts"]:
        lines.append("<ol>" + "".join(_context(s) for s in record["contexts"]) + "</ol>")
    else:
        lines.append('<div class="meta">no contexts (never in a scoring state)</div>')
    lines.append("</section>")
    return "\n".join(lines)


def render_report(data: dict[str, Any], interpretation: dict[str, Any] | None, max_features: int) -> str:
    """The whole page as a string."""
    verdicts = {v["feature"]: v for v in (interpretation or {}).get("features", [])}
    features = data["features"][:max_features]
    summary = dict(data["summary"])
    if interpretation is not None:
        summary["interpretable"] = interpretation["summary"]["interpretable"]
        summary["interpreted"] = interpretation["summary"]["interpreted"]
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary.items())
    shown = (
        f"first {len(features)} of {len(data['features'])} features"
        if len(features) < len(data["features"])
        else f"all {len(features)} features"
    )
    decoded = "decoded with the store's tokenizer" if data["decoded"] else "token ids (no tokenizer recorded)"
    body = "\n".join(_feature(r, verdicts.get(r["feature"])) for r in features)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>bae features: {_e(data['architecture'])}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>Features of a {_e(data['architecture'])} checkpoint</h1>\n"
        f'<p class="meta">score: {_e(data["score"])}; contexts {_e(decoded)}; {_e(shown)}; '
        "the scoring token is highlighted (blue: a bit scoring in its off state).</p>\n"
        f'<table class="summary">{rows}</table>\n{body}\n</body></html>\n'
    )


def write_report(
    out: Path, data: dict[str, Any], interpretation: dict[str, Any] | None, max_features: int
) -> Path:
    return atomic_write_text(out / REPORT_HTML, render_report(data, interpretation, max_features))
