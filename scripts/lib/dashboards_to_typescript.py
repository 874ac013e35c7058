"""Writes each Grafana dashboard as a TypeScript module typed by @grafana/schema's
`Dashboard`, so that `tsc --strict` holds it to Grafana's own schema: an unknown field is an
excess property, a wrong value a type error (JSON imported as such would be widened and
checked far less).

  dashboards_to_typescript.py DASHBOARD_DIR OUT_DIR
"""

import json
import pathlib
import sys


def main():
    source, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.ts"):
        stale.unlink()
    for path in sorted(source.glob("*.json")):
        dashboard = json.loads(path.read_text())
        module = out / (path.stem.replace("-", "_") + ".ts")
        module.write_text(
            f"// {path}\nimport type {{ Dashboard }} from '@grafana/schema';\n\n"
            f"export const dashboard: Dashboard = {json.dumps(dashboard, indent=2)};\n"
        )
        print(module)


if __name__ == "__main__":
    main()
