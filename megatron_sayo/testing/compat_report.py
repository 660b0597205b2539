"""The support matrix's results: one JSON per cell from its pytest junit XML, then compat.json and docs/compat.md.

Standard library only (scripts/compat.sh runs it with whatever python3 the machine has):

    python3 -m megatron_sayo.testing.compat_report cell NAME WHAT VERSIONS_JSON JUNIT_XML BUILD_S TEST_S
    python3 -m megatron_sayo.testing.compat_report table RESULTS_DIR compat.json docs/compat.md
"""

from __future__ import annotations

import json
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from megatron_sayo.formats.atomic import write_bytes_atomic, write_json_atomic

BEGIN, END = "<!-- compat table: written by scripts/compat.sh -->", "<!-- end of compat table -->"
COUNTS = ("tests", "failures", "errors", "skipped")


def junit_counts(xml_path: Path) -> dict[str, int]:
    """tests / failures / errors / skipped summed over the report's test suites, and passed."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in COUNTS}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def cell_result(name: str, what: str, versions: str, xml_path: Path, build_s: float, test_s: float) -> dict:
    """A cell's record: versions, counts, minutes and status ("pass" only with no failure, error or skip)."""
    result = {"cell": name, "what": what, **(json.loads(versions) if versions.strip() else {})}
    if not xml_path.is_file():
        return {**result, "status": "no results", "reason": f"{xml_path} missing (pytest did not run)"}
    counts = junit_counts(xml_path)
    ok = counts["tests"] > 0 and counts["passed"] == counts["tests"]
    return {**result, **counts, "status": "pass" if ok else "fail", "build_minutes": round(build_s / 60, 1),
            "test_minutes": round(test_s / 60, 1), "date": time.strftime("%Y-%m-%d")}


def table(cells: list[dict]) -> str:
    """The markdown table of docs/compat.md."""
    rows = ["| cell | Python | torch | megatron-core | transformers | compat tests passed | minutes | status |",
            "|---|---|---|---|---|---|---|---|"]
    for c in cells:
        passed = f"{c['passed']}/{c['tests']}" if "tests" in c else "-"
        rows.append(f"| {c['cell']} | {c.get('python', '-')} | {c.get('torch', '-')} | {c.get('megatron_core', '-')}"
                    f" | {c.get('transformers', '-')} | {passed} | {c.get('test_minutes', '-')} | {c['status']} |")
    return "\n".join(rows)


def write_table(results_dir: Path, json_path: Path, md_path: Path) -> int:
    """compat.json from every cell's result and the table between the markers of docs/compat.md; exit status."""
    cells = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    write_json_atomic(json_path, {"cells": cells})
    text = md_path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{md_path}: the markers {BEGIN!r} and {END!r} are missing")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_bytes_atomic(md_path, f"{head}{BEGIN}\n{table(cells)}\n{END}{tail}".encode())
    print(table(cells))
    return 0 if cells and all(c["status"] == "pass" for c in cells) else 1


def main(argv: list[str]) -> int:
    if argv[:1] == ["cell"] and len(argv) == 7:
        name, what, versions, xml, build_s, test_s = argv[1:]
        result = cell_result(name, what, versions, Path(xml), float(build_s), float(test_s))
        print(json.dumps(result))
        return 0 if result["status"] == "pass" else 1
    if argv[:1] == ["table"] and len(argv) == 4:
        return write_table(Path(argv[1]), Path(argv[2]), Path(argv[3]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
