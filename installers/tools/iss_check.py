"""A static checker for the Inno Setup script, for machines without Inno Setup (Linux CI).

It runs the subset of the Inno Setup preprocessor the script uses (``#define``, ``#ifdef``,
``#ifndef``, ``#if`` with ``==``/``!=``/``&&``/``||``, ``#else``, ``#endif``, ``#error``,
``{#Name}``), then parses the result: ``[Setup]`` directives (known names only), entry
sections (``Name: value; ...`` with their required parameters and known flags), balanced
``{constants}``, and ``begin``/``end`` balance in ``[Code]``. It is not ``iscc``: Pascal
semantics are not checked.

    python installers/tools/iss_check.py installers/windows/understudy.iss Variant=cuda
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

SETUP_KEYS = frozenset(
    [
        "AppId",
        "AppName",
        "AppVersion",
        "AppVerName",
        "AppPublisher",
        "AppPublisherURL",
        "AppSupportURL",
        "AppUpdatesURL",
        "VersionInfoVersion",
        "DefaultDirName",
        "DefaultGroupName",
        "DisableProgramGroupPage",
        "DisableDirPage",
        "PrivilegesRequired",
        "PrivilegesRequiredOverridesAllowed",
        "ArchitecturesAllowed",
        "ArchitecturesInstallIn64BitMode",
        "MinVersion",
        "OutputDir",
        "OutputBaseFilename",
        "SetupIconFile",
        "UninstallDisplayIcon",
        "UninstallDisplayName",
        "Compression",
        "SolidCompression",
        "WizardStyle",
        "CloseApplications",
        "RestartApplications",
        "DiskSpanning",
        "DiskSliceSize",
        "LicenseFile",
        "UsedUserAreasWarning",
        "ChangesAssociations",
        "Uninstallable",
    ]
)
REQUIRED_PARAMS = {
    "Files": ("Source", "DestDir"),
    "Icons": ("Name", "Filename"),
    "Tasks": ("Name", "Description"),
    "Run": ("Filename",),
    "InstallDelete": ("Type", "Name"),
    "UninstallDelete": ("Type", "Name"),
    "Languages": ("Name", "MessagesFile"),
}
KNOWN_FLAGS = {
    "Files": {"ignoreversion", "recursesubdirs", "createallsubdirs", "replacesameversion"},
    "Run": {"nowait", "postinstall", "skipifsilent", "shellexec", "runascurrentuser"},
    "Tasks": {"unchecked", "checkedonce", "exclusive"},
    "Icons": {"createonlyiffileexists", "excludefromshowinnewinstall"},
}
DELETE_TYPES = {"files", "filesandordirs", "dirifempty"}
DIRECTIVE = re.compile(r"^\s*#\s*(\w+)\s*(.*?)\s*$")
ENTRY_PARAM = re.compile(r'\s*(\w+)\s*:\s*("(?:[^"]|"")*"|[^;]*)\s*(?:;|$)')


class IssError(ValueError):
    """The script cannot be preprocessed (bad directive, #error reached, unknown name)."""


@dataclass
class IssScript:
    """A preprocessed script: ``[Setup]`` directives, entry sections, code and problems."""

    setup: dict[str, str] = field(default_factory=dict)
    entries: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    code: str = ""
    problems: list[str] = field(default_factory=list)


def eval_string_expr(expr: str, defines: dict[str, str]) -> str:
    """Value of ``"a" + Name + "b"``: string literals and defined names joined by ``+``."""
    parts = [p.strip() for p in expr.split("+")]
    out = []
    for part in parts:
        if len(part) >= 2 and part[0] == part[-1] == '"':
            out.append(part[1:-1])
        elif part in defines:
            out.append(defines[part])
        else:
            raise IssError(f"unknown name or bad literal {part!r} in {expr!r}")
    return "".join(out)


def eval_condition(expr: str, defines: dict[str, str]) -> bool:
    """``A == "x" && B != "y" || ...`` (no parentheses; && binds tighter than ||)."""
    return any(
        all(eval_comparison(term, defines) for term in clause.split("&&"))
        for clause in expr.split("||")
    )


def eval_comparison(term: str, defines: dict[str, str]) -> bool:
    """One ``left == right`` or ``left != right`` comparison of string expressions."""
    match = re.fullmatch(r"\s*(.+?)\s*(==|!=)\s*(.+?)\s*", term)
    if match is None:
        raise IssError(f"unsupported #if condition {term!r}")
    left, op, right = match.groups()
    equal = eval_string_expr(left, defines) == eval_string_expr(right, defines)
    return equal if op == "==" else not equal


def expand_inline(line: str, defines: dict[str, str]) -> str:
    """Replace every ``{#Name}`` with its value."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in defines:
            raise IssError(f"{{#{name}}} used but never defined")
        return defines[name]

    return re.sub(r"\{#(\w+)\}", value, line)


def preprocess(text: str, defines: dict[str, str]) -> str:
    """Run the preprocessor subset over ``text`` with command-line ``defines`` (``/DName=v``)."""
    names = dict(defines)
    stack: list[tuple[bool, bool]] = []  # (branch active, some branch already taken)
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        match = DIRECTIVE.match(line)
        active = all(a for a, _ in stack)
        if match is None:
            if active:
                out.append(expand_inline(line, names))
            continue
        try:
            apply_directive(match.group(1), match.group(2), names, stack, active)
        except IssError as exc:
            raise IssError(f"line {number}: {exc}") from None
    if stack:
        raise IssError("#if without #endif")
    return "\n".join(out)


def apply_directive(
    word: str, arg: str, names: dict[str, str], stack: list[tuple[bool, bool]], active: bool
) -> None:
    """Apply one directive to the define table and the conditional stack."""
    if word in ("ifdef", "ifndef", "if"):
        taken = (arg in names) if word == "ifdef" else (arg not in names)
        if word == "if":
            taken = active and eval_condition(arg, names)
        stack.append((taken, taken))
    elif word == "else":
        if not stack:
            raise IssError("#else without #if")
        _, done = stack.pop()
        stack.append((not done, True))
    elif word == "endif":
        if not stack:
            raise IssError("#endif without #if")
        stack.pop()
    elif word == "define" and active:
        name, _, expr = arg.partition(" ")
        names[name] = eval_string_expr(expr, names) if expr.strip() else ""
    elif word == "error" and active:
        raise IssError(f"#error {arg}")
    elif word not in ("define", "error"):
        raise IssError(f"unsupported directive #{word}")


def parse_entry(line: str) -> dict[str, str]:
    """``Name: "x"; Flags: a b`` -> ``{"Name": "x", "Flags": "a b"}`` (quotes removed)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(line.rstrip()):
        match = ENTRY_PARAM.match(line, pos)
        if match is None or match.end() == pos:
            raise IssError(f"cannot parse entry near {line[pos:]!r}")
        value = match.group(2).strip()
        if value.startswith('"'):
            value = value[1:-1].replace('""', '"')
        params[match.group(1)] = value
        pos = match.end()
    return params


def check_braces(text: str, where: str) -> list[str]:
    """A ``{constant}`` left open (``{{`` is a literal brace; a lone ``}`` is literal too)."""
    depth = 0
    for char in text.replace("{{", ""):
        if char == "{":
            if depth:
                return [f"{where}: '{{' inside a constant in {text!r}"]
            depth = 1
        elif char == "}":
            depth = 0
    return [f"{where}: unclosed '{{' in {text!r}"] if depth else []


def check_entry(section: str, params: dict[str, str]) -> list[str]:
    """Required parameters, known flags and delete types of one entry."""
    problems = [
        f"[{section}] entry without {p}: {params}"
        for p in REQUIRED_PARAMS.get(section, ())
        if p not in params
    ]
    unknown = set(params.get("Flags", "").split()) - KNOWN_FLAGS.get(section, set())
    if unknown:
        problems.append(f"[{section}] unknown flags {sorted(unknown)}")
    if section.endswith("Delete") and params.get("Type") not in DELETE_TYPES:
        problems.append(f"[{section}] bad Type {params.get('Type')!r}")
    for key, value in params.items():
        problems += check_braces(value, f"[{section}] {key}")
    return problems


def code_problems(code: str) -> list[str]:
    """``begin``/``case``/``try`` against ``end`` counts; strings must close on their line."""
    problems = []
    words = re.findall(r"\b(begin|case|try|end)\b", re.sub(r"'[^']*'", "''", code), re.I)
    opened = sum(1 for w in words if w.lower() != "end")
    if opened != len(words) - opened:
        problems.append(f"[Code]: {opened} begin/case/try against {len(words) - opened} end")
    for number, line in enumerate(code.splitlines(), 1):
        if line.count("'") % 2:
            problems.append(f"[Code] line {number}: unterminated string: {line.strip()!r}")
    return problems


def parse(text: str) -> IssScript:
    """Split preprocessed text into ``[Setup]`` keys, entry sections and ``[Code]``."""
    script = IssScript()
    section = ""
    code_lines: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            section = header.group(1)
            continue
        if section == "Code":
            code_lines.append(raw)
        elif line and not line.startswith(";"):
            parse_line(script, section, line)
    script.code = "\n".join(code_lines)
    script.problems += code_problems(script.code)
    return script


def parse_line(script: IssScript, section: str, line: str) -> None:
    """Record one non-comment line of a non-code section."""
    if section == "Setup":
        key, sep, value = line.partition("=")
        if not sep or key.strip() not in SETUP_KEYS:
            script.problems.append(f"[Setup]: unknown or malformed directive {line!r}")
        script.setup[key.strip()] = value.strip()
        script.problems += check_braces(value.replace("{{", ""), f"[Setup] {key.strip()}")
    elif section:
        try:
            params = parse_entry(line)
        except IssError as exc:
            script.problems.append(f"[{section}]: {exc}")
            return
        script.entries.setdefault(section, []).append(params)
        script.problems += check_entry(section, params)
    else:
        script.problems.append(f"text outside any section: {line!r}")


def win_path(value: str) -> Path:
    """A relative Windows path from the script (``..\\a\\b``) as a local ``Path``."""
    return Path(*value.split("\\"))


def check_file(path: Path, defines: dict[str, str]) -> IssScript:
    """Preprocess and parse ``path``; also report repository files it names that are missing."""
    script = parse(preprocess(path.read_text(encoding="utf-8"), defines))
    for key in ("SetupIconFile", "LicenseFile"):
        if key in script.setup and not (path.parent / win_path(script.setup[key])).exists():
            script.problems.append(f"[Setup] {key}: {script.setup[key]} does not exist")
    for entry in script.entries.get("Languages", []):
        if not entry["MessagesFile"].startswith("compiler:"):
            script.problems.append(f"[Languages]: {entry['MessagesFile']} is not a compiler file")
    return script


def main(argv: list[str]) -> int:
    """``iss_check.py FILE [Name=value ...]``: print problems, exit 1 when there are any."""
    if not argv:
        print(__doc__)
        return 2
    defines = dict(arg.split("=", 1) for arg in argv[1:])
    try:
        script = check_file(Path(argv[0]), defines)
    except IssError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for problem in script.problems:
        print(problem)
    return 1 if script.problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
