"""Print each failed or errored test of a pytest junit XML with its full output.

Usage: python scripts/failed_tests.py test-results/junit.xml  (what .ci/run does on a red
`make test`). Exits 0; prints nothing for a file without failures.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def main(path: str) -> int:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as err:
        print(f"no junit XML to show ({err})")
        return 0
    for case in root.iter("testcase"):
        problems = [e for e in case if e.tag in ("failure", "error")]
        if not problems:
            continue
        name = f"{case.get('classname')}::{case.get('name')}"
        print(f"\n{'=' * 30} {name} ({case.get('time')} s) {'=' * 30}")
        for element in problems:
            print(f"--- {element.tag}: {element.get('message', '')[:500]}")
            print(element.text or "")
        for stream in ("system-out", "system-err"):
            for element in case.iter(stream):
                if element.text and element.text.strip():
                    print(f"--- {stream}")
                    print(element.text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "test-results/junit.xml"))
