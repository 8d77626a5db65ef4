#!/usr/bin/env python3
"""The worst error each test printed, per CPU-kernel setting, as a Markdown table.

Usage: error_table.py JUNIT.xml [JUNIT.xml ...]

Each file is the JUnit report of one `scripts/test.sh` run (nextest profile
`errors` keeps every test's output; test.sh copies the report to
target/nextest/errors/junit-<setting>.xml). A column per file, a row per test
that printed an error figure: the largest number on its lines that speak of an
error or a difference ("max abs err", "worst relative error", "diff"), leaving
out bounds, the compared values themselves, log lines, "departs" lines (the
size of a departure from diffusers is not an error) and negative controls (a
check that a perturbed weight, or a missing adapter, does miss the reference).
"""
import pathlib
import re
import sys
import xml.etree.ElementTree as ET

NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?e[-+]?\d+")
SPEAKS = re.compile(r"\berr\b|error|diff", re.I)
# Log lines (timestamped), departures from diffusers, negative controls.
SKIP = re.compile(r"^\s*\d{4}-\d\d-\d\dT|departs|without the|perturbed|misses")
DROP = [
    re.compile(r"bound[^,;)]*"),  # the bound a figure is held to
    re.compile(r"ours \S+ reference \S+"),  # the values compared
    re.compile(r"\(relative to [^)]*\)"),
    re.compile(r"against 4·e1[^;]*"),
]


def worst(text: str):
    best = None
    for line in text.splitlines():
        if not SPEAKS.search(line) or SKIP.search(line):
            continue
        for d in DROP:
            line = d.sub("", line)
        for m in NUMBER.findall(line):
            v = abs(float(m))
            best = v if best is None else max(best, v)
    return best


def read(path: pathlib.Path):
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')} {case.get('name', '')}".strip()
        text = "".join((e.text or "") for e in case if e.tag in ("system-out", "system-err"))
        for e in case:
            if e.tag in ("failure", "error", "flakyFailure", "rerunFailure"):
                text += (e.text or "") + "".join((x.text or "") for x in e)
        if "fails_when" in name:
            continue  # a negative control: its figure is meant to be large
        w = worst(text)
        failed = any(e.tag in ("failure", "error") for e in case)
        if w is not None or failed:
            out[name] = (w, failed)
    return out


def main() -> None:
    files = [pathlib.Path(p) for p in sys.argv[1:]]
    if not files:
        sys.exit(__doc__)
    runs = [read(f) for f in files]
    names = sorted(set().union(*runs))
    heads = [f.stem.removeprefix("junit-") for f in files]
    print("| test | " + " | ".join(heads) + " |")
    print("| --- |" + " --- |" * len(heads))
    for n in names:
        cells = []
        for r in runs:
            w, failed = r.get(n, (None, False))
            cell = "—" if w is None else f"{w:.1e}"
            cells.append(cell + (" FAILED" if failed else ""))
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
