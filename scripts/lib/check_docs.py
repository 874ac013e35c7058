"""Holds the documentation to the repository:

- every relative link of README.md and docs/*.md leads to a file, and to a heading of it
  when it names one (GitHub's anchors);
- every command of a fenced `sh` block of the README's quick start exists: a script of
  scripts/ that is executable, or a program on the PATH;
- docs/configuration.md lists every setting of both services and no other, both as the code
  declares them (the settings structs of the service's configuration.rs and of
  libs/observability) and as config/base.yaml holds them, each with its default in
  config/base.yaml, a type that fits it, the variable that sets it, and whether it is a
  secret (a `SecretString`).

  check_docs.py
"""

import pathlib
import re
import shlex
import shutil
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICES = {"Gateway": "gateway", "Data service": "data-service"}


def anchor(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def headings(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {anchor(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.M)}


def check_links(files):
    problems = []
    for path in files:
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://|mailto:", target):
                continue
            file, _, fragment = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            if not linked.exists():
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such file")
            elif fragment and linked.suffix == ".md" and fragment not in headings(linked):
                problems.append(f"{path.relative_to(ROOT)}: link to {target}: no such heading")
    return problems


def check_quick_start(readme):
    section = re.search(r"^## Quick start\n(.*?)(?=^## )", readme.read_text(), flags=re.M | re.S)
    if not section:
        return ["README.md: no Quick start section"]
    problems, commands = [], 0
    for block in re.findall(r"```sh\n(.*?)```", section.group(1), flags=re.S):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            words = shlex.split(line)
            while words and re.fullmatch(r"\w+=.*", words[0]):
                words = words[1:]
            if not words:
                continue
            command, commands = words[0], commands + 1
            if command.startswith("scripts/"):
                script = ROOT / command
                if not script.is_file() or not script.stat().st_mode & 0o111:
                    problems.append(f"README.md quick start: {command} is not an executable script")
            elif shutil.which(command) is None:
                problems.append(f"README.md quick start: {command} is not a program on the PATH")
    if not commands:
        problems.append("README.md quick start: no sh block")
    return problems


def flatten(node, prefix=""):
    """(key, value) of every setting; a list of objects by its first element (`routes[].x`)."""
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, path + ".")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            yield from flatten(value[0], path + "[].")
        else:
            yield path, value


def settings_structs(service):
    """The settings structs (those that derive Deserialize) of the service's configuration.rs
    and of the shared library: name -> [(field, type)]."""
    sources = [ROOT / f"services/{service}/src/configuration.rs", *sorted((ROOT / "libs/observability/src").glob("*.rs"))]
    structs = {}
    for source in sources:
        text = source.read_text()
        for derive, name, body in re.findall(r"#\[derive\(([^)]*)\)\]\s*(?:#\[[^\]]*\]\s*)*pub struct (\w+) \{(.*?)\n\}", text, flags=re.S):
            if "Deserialize" in derive:
                structs[name] = re.findall(r"^\s*pub (\w+): ([^\n]+?),\s*$", body, flags=re.M)
    return structs


def code_settings(service):
    """Every key of the service's Settings as the code declares it, named as the reference
    names them (`upstreams.<name>.urls`, `routes[].prefix`): key -> Rust type."""
    structs = settings_structs(service)

    def walk(struct, prefix):
        for field, rust_type in structs[struct]:
            key = prefix + field
            if rust_type in structs:
                yield from walk(rust_type, key + ".")
                continue
            inner = re.fullmatch(r"(?:BTreeMap|HashMap)<String, (\w+)>", rust_type)
            if inner and inner.group(1) in structs:
                yield from walk(inner.group(1), key + ".<name>.")
                continue
            inner = re.fullmatch(r"Vec<(\w+)>", rust_type)
            if inner and inner.group(1) in structs:
                yield from walk(inner.group(1), key + "[].")
                continue
            yield key, rust_type

    return dict(walk("Settings", ""))


def rendered(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(rendered(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


def type_of(value):
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "list"}[type(value)]


def variable_of(key):
    if "[]" in key:
        return "in a file"
    return "APP__" + key.replace(".", "__").upper()


def check_configuration(reference):
    text = reference.read_text()
    problems = []
    for title, service in SERVICES.items():
        section = re.search(rf"^## {title}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
        if not section:
            problems.append(f"configuration.md: no section {title}")
            continue
        documented = {}
        for row in re.findall(r"^\| `([^`]+)` \|(.*)\|\s*$", section.group(1), flags=re.M):
            cells = [cell.strip() for cell in row[1].split("|")]
            documented[row[0]] = cells
        base = yaml.safe_load((ROOT / f"services/{service}/config/base.yaml").read_text())
        actual = dict(flatten(base))
        # Map keys name the map's entries by a placeholder: `upstreams.<name>.urls`.
        expanded = {}
        for key, cells in documented.items():
            if "<name>" in key:
                pattern = re.escape(key).replace(re.escape("<name>"), r"[^.]+")
                matches = [k for k in actual if re.fullmatch(pattern, k)]
                if not matches:
                    problems.append(f"configuration.md {title}: {key} names no setting")
                for match in matches:
                    expanded[match] = (key, cells)
            else:
                expanded[key] = (key, cells)
        for key in sorted(set(actual) - set(expanded)):
            problems.append(f"configuration.md {title}: the setting {key} is missing")
        for key in sorted(set(expanded) - set(actual)):
            problems.append(f"configuration.md {title}: {key} is no setting of the {service}")
        declared = code_settings(service)
        for key in sorted(set(declared) - set(documented)):
            problems.append(f"configuration.md {title}: {key} (in the code's settings) is missing")
        for key in sorted(set(documented) - set(declared)):
            problems.append(f"configuration.md {title}: {key} is not in the code's settings")
        secret_keys = {key for key, rust_type in declared.items() if rust_type == "SecretString"}
        for key, (written, cells) in expanded.items():
            if key not in actual:
                continue
            kind, default, variable, secret = cells[0], cells[1], cells[2], cells[3]
            value = actual[key]
            if not kind.startswith(type_of(value)):
                problems.append(f"configuration.md {title}: {written} is documented as {kind}, but is {type_of(value)}")
            if default.strip("`") != rendered(value):
                problems.append(f"configuration.md {title}: {written} default {default} differs from {rendered(value)!r}")
            wanted = variable_of(written)
            if wanted not in variable:
                problems.append(f"configuration.md {title}: {written}: the variable is {wanted}, not {variable}")
            if (secret == "yes") != (written in secret_keys):
                problems.append(f"configuration.md {title}: {written}: secret is {'yes' if written in secret_keys else 'no'}")
    return problems


def main():
    docs = sorted((ROOT / "docs").glob("*.md"))
    problems = check_links([ROOT / "README.md", *docs])
    problems += check_quick_start(ROOT / "README.md")
    problems += check_configuration(ROOT / "docs/configuration.md")
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        sys.exit(1)
    print(f"README.md and {len(docs)} pages of docs/: links, quick start and the configuration reference hold")


if __name__ == "__main__":
    main()
