"""Static, offline HTML pages of features: an index of every feature and one page per feature.

``report.html`` lists every feature (no cap) in one table with a search box and sortable columns
(index, frequency, oriented frequency, assigned tokens, ComSem score when ``interpretation.json``
exists); each row links to ``report/f<j>.html`` with the feature's contexts, their per-context
scores and its explanation. Everything opens from disk (no server, no external resources); all text
from the corpus or the LLM is HTML-escaped and the only script is the index's own sort and filter.
"""

from __future__ import annotations

import html
import shutil
from pathlib import Path
from typing import Any

from bae.common.atomic_files import atomic_write_text, temporary_dir
from bae.trainer.models import replace_dir

REPORT_HTML = "report.html"
PAGES_DIR = "report"
PREVIEW_CONTEXTS = 3  # context tokens shown in an index row

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 75em; color: #222; }
table.summary td { padding: 0 1em 0 0; }
.meta { color: #555; font-size: 0.9em; }
.explanation { font-style: italic; }
ol { margin: 0.3em 0; }
li { margin: 0.15em 0; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; }
.score { color: #777; font-size: 0.8em; margin-right: 0.6em; }
mark { background: #ffd54f; padding: 0 1px; }
mark.off { background: #90caf9; }
.yes { color: #2e7d32; } .no { color: #c62828; }
table.index { border-collapse: collapse; width: 100%; }
table.index td, table.index th { padding: 0.15em 0.5em; border-bottom: 1px solid #eee; text-align: left; }
table.index th[data-k] { cursor: pointer; user-select: none; }
table.index td.n { text-align: right; font-variant-numeric: tabular-nums; }
"""

# Sort by a clicked header's data-k (a row's data-* value, numeric; blank sorts last), filter by the
# text of each row. Plain DOM, no external code.
_SCRIPT = """
const body = document.querySelector('table.index tbody');
const rows = Array.from(body.rows);
const text = rows.map(r => r.textContent.toLowerCase());
const count = document.getElementById('count');
function filter() {
  const q = document.getElementById('q').value.toLowerCase().trim();
  let shown = 0;
  rows.forEach((r, i) => { const on = !q || text[i].includes(q); r.hidden = !on; shown += on; });
  count.textContent = shown + ' of ' + rows.length + ' features';
}
let key = 'i', dir = 1;
function sortBy(k) {
  dir = (k === key) ? -dir : (k === 'i' ? 1 : -1); key = k;
  const value = r => r.dataset[k] === '' ? NaN : Number(r.dataset[k]);
  rows.sort((a, b) => {
    const x = value(a), y = value(b);
    if (isNaN(x) || isNaN(y)) return isNaN(x) - isNaN(y) || a.dataset.i - b.dataset.i;
    return (x - y) * dir || a.dataset.i - b.dataset.i;
  });
  body.append(...rows);
  document.querySelectorAll('th[data-k] span').forEach(s =>
    s.textContent = s.parentNode.dataset.k === key ? (dir > 0 ? ' ▲' : ' ▼') : '');
}
document.getElementById('q').addEventListener('input', filter);
document.querySelectorAll('th[data-k]').forEach(th =>
  th.addEventListener('click', () => sortBy(th.dataset.k)));
filter();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: str, script: str = "") -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n{body}\n"
        + (f"<script>{script}</script>\n" if script else "")
        + "</body></html>\n"
    )


def _context(sample: dict[str, Any]) -> str:
    off = ' class="off" title="bit off (its rarer state)"' if sample.get("bit") == 0 else ""
    return (
        f'<li><span class="score">{sample["score"]:.4g}</span><span class="ctx">{_e(sample["before"])}'
        f"<mark{off}>{_e(sample['token'])}</mark>{_e(sample['after'])}</span>"
        f' <span class="meta">doc {sample["doc"]} pos {sample["position"]}</span></li>'
    )


def _meta(record: dict[str, Any]) -> str:
    meta = [f"frequency {record['frequency']:.4g}"]
    if "oriented_frequency" in record:
        meta.append(f"oriented {record['oriented_frequency']:.4g}")
    meta.append(f"assigned tokens {record['assigned']}")
    return " · ".join(meta)


def _verdict(verdict: dict[str, Any] | None) -> str:
    if verdict is None:
        return ""
    if not verdict.get("explanation"):
        return f'<div class="meta">not interpreted: {_e(verdict.get("reason", ""))}</div>'
    mark = "yes" if verdict["interpretable"] else "no"
    return (
        f'<div>explanation: <span class="explanation">{_e(verdict["explanation"])}</span> '
        f'<span class="{mark}">score {verdict["score"]:.2f}'
        f"{' (interpretable)' if verdict['interpretable'] else ''}</span></div>"
    )


def feature_page(data: dict[str, Any], record: dict[str, Any], verdict: dict[str, Any] | None) -> str:
    """One feature's page: frequency, explanation, contexts best first with their scores."""
    j, last = record["feature"], len(data["features"]) - 1
    nav = [f'<a href="../{REPORT_HTML}">index</a>']
    nav += [f'<a href="f{j - 1}.html">← {j - 1}</a>'] if j > 0 else []
    nav += [f'<a href="f{j + 1}.html">{j + 1} →</a>'] if j < last else []
    if record["contexts"]:
        contexts = "<ol>" + "".join(_context(s) for s in record["contexts"]) + "</ol>"
    else:
        contexts = '<div class="meta">no contexts (never in a scoring state)</div>'
    body = (
        f'<div class="meta">{" · ".join(nav)}</div>\n<h1>Feature {j}</h1>\n'
        f'<div class="meta">{_e(_meta(record))}</div>\n{_verdict(verdict)}\n'
        f'<p class="meta">contexts best first; score: {_e(data["score"])} (blue: a bit scoring in its off '
        f"state)</p>\n{contexts}"
    )
    return _page(f"feature {j}", body)


def _row(record: dict[str, Any], verdict: dict[str, Any] | None, bae: bool, interpreted: bool) -> str:
    j = record["feature"]
    score = verdict.get("score", "") if verdict else ""
    keys = f'data-i="{j}" data-f="{record["frequency"]:.6g}" data-a="{record["assigned"]}"'
    cells = [f'<td class="n"><a href="{PAGES_DIR}/f{j}.html">{j}</a></td>']
    cells.append(f'<td class="n">{record["frequency"]:.4g}</td>')
    if bae:
        keys += f' data-o="{record["oriented_frequency"]:.6g}"'
        cells.append(f'<td class="n">{record["oriented_frequency"]:.4g}</td>')
    cells.append(f'<td class="n">{record["assigned"]}</td>')
    preview = " · ".join(repr(c["token"])[1:-1] for c in record["contexts"][:PREVIEW_CONTEXTS])
    cells.append(f'<td class="ctx">{_e(preview)}</td>')
    if interpreted:
        keys += f' data-s="{score}"'
        explanation = (verdict or {}).get("explanation") or ""
        cells.append(f'<td class="explanation">{_e(explanation)}</td>')
        cells.append(f'<td class="n">{f"{score:.2f}" if score != "" else ""}</td>')
    return f"<tr {keys}>{''.join(cells)}</tr>"


def index_page(data: dict[str, Any], interpretation: dict[str, Any] | None) -> str:
    """Every feature in one searchable, sortable table linking to its page."""
    verdicts = {v["feature"]: v for v in (interpretation or {}).get("features", [])}
    bae = data["architecture"] == "bae"
    summary = dict(data["summary"])
    if interpretation is not None:
        summary["interpretable"] = interpretation["summary"]["interpretable"]
        summary["interpreted"] = interpretation["summary"]["interpreted"]
    table = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in summary.items())
    heads = ['<th data-k="i">feature<span></span></th>', '<th data-k="f">frequency<span></span></th>']
    heads += ['<th data-k="o">oriented<span></span></th>'] if bae else []
    heads += ['<th data-k="a">assigned<span></span></th>', "<th>top contexts</th>"]
    if interpretation is not None:
        heads += ["<th>explanation</th>", '<th data-k="s">ComSem score<span></span></th>']
    rows = "\n".join(
        _row(r, verdicts.get(r["feature"]), bae, interpretation is not None) for r in data["features"]
    )
    decoded = "decoded with the store's tokenizer" if data["decoded"] else "token ids (no tokenizer recorded)"
    body = (
        f"<h1>Features of a {_e(data['architecture'])} checkpoint</h1>\n"
        f'<p class="meta">all {len(data["features"])} features; context score: {_e(data["score"])}; '
        f"contexts {_e(decoded)}. Click a column to sort, type to filter (index, tokens, "
        "explanation).</p>\n"
        f'<table class="summary">{table}</table>\n'
        '<p><input id="q" type="search" placeholder="filter features" size="40"> '
        '<span id="count" class="meta"></span></p>\n'
        f'<table class="index"><thead><tr>{"".join(heads)}</tr></thead><tbody>\n{rows}\n</tbody></table>'
    )
    return _page(f"bae features: {data['architecture']}", body, _SCRIPT)


def write_report(out: Path, data: dict[str, Any], interpretation: dict[str, Any] | None) -> Path:
    """``<out>/report.html`` and ``<out>/report/f<j>.html``; the pages directory is swapped in whole,
    then the index is replaced."""
    verdicts = {v["feature"]: v for v in (interpretation or {}).get("features", [])}
    pages = temporary_dir(out / PAGES_DIR)
    try:
        for record in data["features"]:
            j = record["feature"]
            (pages / f"f{j}.html").write_text(feature_page(data, record, verdicts.get(j)), encoding="utf-8")
        replace_dir(pages, out / PAGES_DIR)
    finally:
        shutil.rmtree(pages, ignore_errors=True)
    return atomic_write_text(out / REPORT_HTML, index_page(data, interpretation))
