#!/usr/bin/env python3
"""Benchmark logs in, a Markdown report and one SVG chart per comparison out.

Reads the tables the benchmark scripts print (scripts/bench.sh and the ../shared peers
script, scripts/ab.sh, bench-tls.sh, bench-h3.sh, bench-l4.sh): a header line whose first
word is `proxy` or `server`, then one row per run. Text columns (protocol, mode) split a
table into comparisons; numeric columns are averaged per server over its runs. Each
comparison becomes a Markdown table (with each server's ratio to fluxgate) and an SVG with
one bar panel per metric (fluxgate's bars in blue, the peers' in grey).

Usage: scripts/report.py OUT_DIR LOG [LOG ...]    (writes OUT_DIR/report.md and *.svg)
       scripts/report.py --self-test
"""

import html
import os
import re
import sys
from collections import OrderedDict

HEADS = {"proxy", "server"}
# What each known column is, and whether less is better.
METRICS = {
    "req_s": ("requests/s", False),
    "p99_ms": ("p99 latency, ms", True),
    "cpu_us_req": ("CPU µs per request", True),
    "hs_per_s": ("handshakes/s", False),
    "cpu_us_per_hs": ("CPU µs per handshake", True),
    "gb_s": ("GB/s", False),
    "cpu_s_gb": ("CPU s per GB", True),
}
OURS = re.compile(r"^(fluxgate|new|old|ours)", re.I)


def number(s):
    try:
        return float(s)
    except ValueError:
        return None


def parse(text, source):
    """Yields (title, header, rows) for each table in `text`."""
    title, header, rows = source, None, []
    for line in text.splitlines() + [""]:
        words = line.split()
        if header is not None:
            if len(words) >= len(header) and not words[0].startswith("=") and words[0] not in HEADS:
                cells = words[: len(header)]
                if any(number(c) is not None for c in cells[1:]):
                    rows.append(cells)
                    continue
            if rows:
                yield title, header, rows
            header, rows = None, []
        if line.startswith("== "):
            title = line[3:].strip()
        elif words and words[0] in HEADS:
            header, rows = words, []


def comparisons(tables):
    """(title, key, metrics, {server: {metric: mean}}) per text-column value of each table."""
    out = []
    for title, header, rows in tables:
        text_cols = [i for i in range(1, len(header)) if all(number(r[i]) is None for r in rows)]
        num_cols = [i for i in range(1, len(header)) if i not in text_cols]
        groups = OrderedDict()
        for r in rows:
            key = " ".join(r[i] for i in text_cols)
            sums = groups.setdefault(key, OrderedDict()).setdefault(r[0], {})
            for i in num_cols:
                v = number(r[i])
                if v is not None:
                    s = sums.setdefault(header[i], [0.0, 0])
                    s[0] += v
                    s[1] += 1
        for key, servers in groups.items():
            means = OrderedDict(
                (name, {m: s / n for m, (s, n) in vals.items()}) for name, vals in servers.items()
            )
            metrics = [header[i] for i in num_cols if any(header[i] in v for v in means.values())]
            out.append((title, key, metrics, means))
    return out


def ours_of(means):
    for name in means:
        if name.lower().startswith("fluxgate") or name == "new":
            return name
    return next(iter(means))


def markdown(title, key, metrics, means):
    """The comparison as a table; its last column is ours over each server's figure of the
    CPU cost when the script measured one, else of its first metric."""
    ours = ours_of(means)
    lines = [f"### {title}" + (f" ({key})" if key else ""), ""]
    ratio_of = next((m for m in metrics if m.startswith("cpu")), metrics[0] if metrics else None)
    cols = ["server"] + [METRICS.get(m, (m, False))[0] for m in metrics]
    if ratio_of:
        cols.append(f"{ours}/server, {METRICS.get(ratio_of, (ratio_of,))[0]}")
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    base = means[ours].get(ratio_of) if ratio_of else None
    for name, vals in means.items():
        row = [f"**{name}**" if name == ours else name]
        for m in metrics:
            v = vals.get(m)
            row.append("–" if v is None else f"{v:,.1f}")
        if ratio_of:
            v = vals.get(ratio_of)
            row.append("–" if not v or base is None else f"{base / v:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def svg(title, key, metrics, means):
    ours = ours_of(means)
    names = list(means)
    bar_h, gap, label_w, panel_w = 18, 6, 110, 300
    panel_h = len(names) * (bar_h + gap) + 34
    width = label_w + len(metrics) * (panel_w + 20) + 20
    height = panel_h + 44
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="10" y="20" font-size="14" font-weight="bold">{html.escape(title + (" — " + key if key else ""))}</text>',
    ]
    for i, name in enumerate(names):
        y = 44 + 24 + i * (bar_h + gap) + bar_h - 5
        weight = "bold" if name == ours else "normal"
        out.append(f'<text x="10" y="{y}" font-weight="{weight}">{html.escape(name)}</text>')
    for p, m in enumerate(metrics):
        x0 = label_w + p * (panel_w + 20)
        label, lower_better = METRICS.get(m, (m, False))
        hint = " (less is better)" if lower_better else " (more is better)"
        out.append(f'<text x="{x0}" y="54" font-weight="bold">{html.escape(label + hint)}</text>')
        top = max((v.get(m) or 0) for v in means.values()) or 1
        for i, name in enumerate(names):
            v = means[name].get(m)
            y = 44 + 24 + i * (bar_h + gap)
            if v is None:
                out.append(f'<text x="{x0}" y="{y + bar_h - 5}" fill="#888">–</text>')
                continue
            w = max(1, int((panel_w - 70) * v / top))
            colour = "#1f77b4" if name == ours else "#9aa0a6"
            out.append(f'<rect x="{x0}" y="{y}" width="{w}" height="{bar_h}" fill="{colour}"/>')
            out.append(f'<text x="{x0 + w + 4}" y="{y + bar_h - 5}">{v:,.1f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def slug(s):
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")[:60] or "comparison"


def report(out_dir, logs):
    os.makedirs(out_dir, exist_ok=True)
    tables = []
    for path in logs:
        with open(path, encoding="utf-8", errors="replace") as f:
            tables.extend(parse(f.read(), os.path.basename(path)))
    comps = comparisons(tables)
    if not comps:
        sys.exit(f"no benchmark tables found in {', '.join(logs)}")
    md = ["# fluxgate benchmark report", "",
          "Means over each server's runs, from one run of the scripts on one machine: compare "
          "the ratios, not the absolute figures.", ""]
    seen = {}
    for title, key, metrics, means in comps:
        name = slug(title)[:50].strip("-") + ("-" + slug(key) if key else "")
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name += f"-{seen[name]}"
        with open(os.path.join(out_dir, name + ".svg"), "w", encoding="utf-8") as f:
            f.write(svg(title, key, metrics, means))
        md.append(markdown(title, key, metrics, means))
        md.append(f"![{html.escape(title)}]({name}.svg)\n")
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(md))
    return comps


SAMPLE = """\
== 1. fluxgate vs nginx vs HAProxy (proxy on CPU 1; upstream and load on CPU 0)
proxy    proto       req_s    p99_ms   cpu_us_req
fluxgate h1       90000.0     1.20         10.0
nginx    h1       60000.0     2.40         20.0
haproxy  h1       80000.0     1.60         12.5
fluxgate h2c     120000.0        -          8.0
haproxy  h2c     100000.0        -         10.0

== 6. tracing: off (old) vs on at a 1% sample ratio
proxy    prot      req_s  cpu_us_req
old      h1     80000.0        10.0
new      h1     79000.0        10.2
old      h1     82000.0        10.0
new      h1     81000.0        10.4
mean cpu_us_req h1 : old 10.0, new 10.3, haproxy 12.0 (new/old 1.03, new/haproxy 0.86)
"""


def self_test():
    import tempfile
    d = tempfile.mkdtemp()
    log = os.path.join(d, "bench.log")
    with open(log, "w") as f:
        f.write(SAMPLE)
    comps = report(d, [log])
    keys = [(t[:2], k) for t, k, _, _ in comps]
    assert keys == [("1.", "h1"), ("1.", "h2c"), ("6.", "h1")], keys
    h1 = comps[0][3]
    assert list(h1) == ["fluxgate", "nginx", "haproxy"]
    assert comps[0][2] == ["req_s", "p99_ms", "cpu_us_req"]
    assert comps[1][2] == ["req_s", "cpu_us_req"], comps[1][2]
    tracing = comps[2][3]
    assert abs(tracing["new"]["cpu_us_req"] - 10.3) < 1e-9 and tracing["old"]["req_s"] == 81000.0
    md = open(os.path.join(d, "report.md")).read()
    assert "| **fluxgate** | 90,000.0 | 1.2 | 10.0 | 1.00 |" in md, md
    assert "| nginx | 60,000.0 | 2.4 | 20.0 | 0.50 |" in md, md
    svgs = sorted(n for n in os.listdir(d) if n.endswith(".svg"))
    assert len(svgs) == 3, svgs
    h1_svg = [n for n in svgs if n.startswith("1-") and n.endswith("-h1.svg")]
    s = open(os.path.join(d, h1_svg[0])).read()
    assert s.startswith("<svg") and s.count("<rect") >= 7, s
    print("report.py self-test: ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    elif len(sys.argv) >= 3:
        comps = report(sys.argv[1], sys.argv[2:])
        print(f"{len(comps)} comparison(s) written to {sys.argv[1]}/report.md")
    else:
        sys.exit(__doc__)
