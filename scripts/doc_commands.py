"""Every command the README and ``docs/*.md`` show, checked against the real command line.

    python scripts/check_docs.py            # the commands and links of README.md and docs/*.md

A command is a line of a ```bash / ```sh / ```shell block (all its lines but
comments), or a ``$ `` line of any other block (```console, or a plain block that
shows a command and its output). Each is split at ``&&``, ``||``, ``;`` and ``|``,
and each part is checked by what it runs:

* ``opaudit ...``, ``python -m opaudit ...`` and ``torchrun ... -m opaudit ...``:
  parsed by opaudit's own parser for that subcommand (an option that does not exist,
  a bad value, a missing argument is a problem, with argparse's message), and every
  file it reads (a path-like argument that is not an output) exists in the
  repository or is written by an earlier command of the same page (``-o FILE``, a
  redirection);
* ``python FILE ...`` (a script of the repository): the file exists and every
  ``--option`` given appears in its source; ``python -m pytest PATHS``: the paths
  exist;
* ``pip install -e '.[a,b]'``: the extras exist in ``pyproject.toml``;
* another program must be one a reader has (``KNOWN_PROGRAMS``), so a typo shows.

A block that is deliberately not runnable as written (a placeholder ``train.py``,
another machine's catalog) says so on the line before its fence, where Markdown
does not show it::

    <!-- check_docs: not runnable (a placeholder script) -->

Links between pages are checked too: every relative link and image of README.md
and docs/*.md names a file of the repository, and a ``#fragment`` a heading of
that file (GitHub's anchor rules).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NOT_RUNNABLE = re.compile(r"<!--\s*check_docs:\s*not runnable\b")
SHELL_LANGS = {"bash", "sh", "shell"}
COMMAND_START = re.compile(r"\s*(opaudit|python3?|torchrun|pip) ")
"""A plain block that starts like this is commands without their ```bash (so nothing would check them)."""
UNMARKED = "\0unmarked "
CODE_LANGS = {"python", "py", "yaml", "yml", "json", "toml", "markdown", "md", "csv", "html", "diff", "text"}
"""Blocks that are never commands, whatever their lines start with."""
KNOWN_PROGRAMS = {
    "opaudit", "python", "python3", "torchrun", "pip", "pip3", "echo", "cat", "cmp", "diff", "jq", "ls", "cd",
    "time", "git", "head", "tail", "grep", "sed", "export", "bash", "sh", "true", "timeout", "env", "wc",
    "nvidia-smi", "rm", "mkdir", "cp", "unzip", "zipinfo", "sort", "gh",
}
OUTPUT_OPTIONS = {"-o", "--output", "--per-rank-reports"}
"""Options whose value opaudit writes (so it need not exist)."""
PATH_SUFFIXES = (".py", ".yaml", ".yml", ".json", ".csv", ".md", ".html", ".sarif", ".opcap", ".sh", ".txt",
                 ".optrace")


@dataclass(frozen=True)
class Command:
    """One simple command of a page: where it is and its words."""

    page: str
    line: int
    text: str
    words: tuple[str, ...]


@dataclass(frozen=True)
class Problem:
    """Something a page shows that does not hold."""

    page: str
    line: int
    text: str
    message: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.message}\n    {self.text}"


def pages(root: str = ROOT) -> list[str]:
    """README.md and docs/*.md, relative to ``root``."""
    docs = os.path.join(root, "docs")
    return ["README.md"] + sorted(f"docs/{n}" for n in os.listdir(docs) if n.endswith(".md"))


def _tokens(text: str):
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").enable("table").parse(text)


def command_lines(page: str, root: str = ROOT) -> Iterator[tuple[int, str, bool]]:
    """``(line, command text, runnable)`` for every command a page shows, in page order."""
    with open(os.path.join(root, page), encoding="utf-8") as f:
        tokens = _tokens(f.read())
    previous = None
    for tok in tokens:
        if tok.type in ("fence", "code_block") and tok.map is not None:
            lang = tok.info.strip().split(" ")[0].lower() if tok.type == "fence" else ""
            runnable = not (previous is not None and previous.type == "html_block"
                            and NOT_RUNNABLE.search(previous.content))
            first = tok.map[0] + (2 if tok.type == "fence" else 1)
            yield from ((first + i, text, runnable) for i, text in _block_commands(lang, tok.content))
        if tok.type not in ("paragraph_close", "list_item_open", "bullet_list_open", "ordered_list_open"):
            previous = tok


def _block_commands(lang: str, content: str) -> Iterator[tuple[int, str]]:
    if lang in CODE_LANGS:
        return
    lines = content.split("\n")
    prompted = any(ln.lstrip().startswith("$ ") for ln in lines)
    if lang not in SHELL_LANGS and not prompted:
        if COMMAND_START.match(lines[0]):
            yield 0, UNMARKED + lines[0].strip()
        return
    i = 0
    while i < len(lines):
        start, text = i, lines[i].strip()
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1] + " " + lines[i].strip()
        i += 1
        if prompted:
            if text.startswith("$ "):
                yield start, text[2:].strip()
        elif text and not text.startswith("#"):
            yield start, text


def split_commands(page: str, line: int, text: str) -> list[Command]:
    """A shell line's simple commands (split at ``&&``, ``||``, ``;``, ``|``).

    A redirection's target stays in its command as ``>PATH`` (a file it writes);
    an input redirection and a file-descriptor digit before ``>`` are dropped.
    """
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    out: list[Command] = []
    current: list[str] = []
    pending = ""
    for w in [*lex, ";"]:
        if pending:
            if pending != "<":
                current.append(f">{w}")
            pending = ""
        elif w in ("&&", "||", ";", "|", "&"):
            if current:
                out.append(Command(page, line, text, tuple(current)))
            current = []
        elif w in (">", ">>", "<", "&>", ">&"):
            pending = w
            if current and re.fullmatch(r"[0-9]", current[-1]):
                current.pop()
        else:
            current.append(w)
    return out


def _env_stripped(words: tuple[str, ...]) -> tuple[str, ...]:
    """The command a line runs: without ``VAR=value`` prefixes and wrappers (``time``, ``timeout 20``)."""
    i = 0
    while i < len(words) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[i]):
        i += 1
    rest = words[i:]
    if rest and rest[0] in ("time", "env", "nice"):
        return _env_stripped(rest[1:])
    if rest and rest[0] == "timeout":  # timeout [-s SIG] [--preserve-status ...] DURATION COMMAND...
        j = 1
        while j < len(rest) and rest[j].startswith("-"):
            j += 2 if rest[j] in ("-s", "--signal", "-k", "--kill-after") else 1
        return _env_stripped(rest[j + 1:])
    return rest


def opaudit_argv(words: tuple[str, ...]) -> list[str] | None:
    """The arguments given to opaudit by a command, or ``None`` when it does not run opaudit."""
    if not words:
        return None
    prog = os.path.basename(words[0])
    if prog == "opaudit":
        return list(words[1:])
    if prog in ("python", "python3", "torchrun") or re.fullmatch(r"python3(\.\d+)?", prog):
        for i in range(1, len(words) - 1):
            if words[i] == "-m" and words[i + 1] == "opaudit":
                return list(words[i + 2:])
    return None


class _Parsed(BaseException):
    """Raised by the patched parser once it has parsed: the command is never run."""


@contextlib.contextmanager
def _parse_only() -> Iterator[None]:
    from opaudit.cli.options import Parser

    real = Parser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise _Parsed

    Parser.parse_args = parse_and_stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        Parser.parse_args = real  # type: ignore[method-assign]


def parse_error(argv: list[str]) -> str | None:
    """What opaudit's own parser says about ``argv`` (``None``: it parses), without running anything."""
    from opaudit.cli.main import SUBCOMMANDS, audit_main
    from opaudit.data.errors import OpauditError

    run, rest = (SUBCOMMANDS[argv[0]], argv[1:]) if argv and argv[0] in SUBCOMMANDS else (audit_main, argv)
    out, err = io.StringIO(), io.StringIO()
    try:
        with _parse_only(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run(rest)
    except _Parsed:
        return None
    except SystemExit as e:  # --help, --version
        return None if e.code in (0, None) else f"exit {e.code}: {err.getvalue().strip()}"
    except OpauditError as e:
        return str(e)
    return "the command ran past its parser (a subcommand that does work before parse_args?)"


def _looks_like_path(word: str) -> bool:
    if word.startswith("-") or "://" in word or "=" in word or "*" in word:
        return False
    return "/" in word or word.endswith(PATH_SUFFIXES)


def _outputs(words: list[str]) -> set[str]:
    out = set()
    for i, w in enumerate(words):
        if w in OUTPUT_OPTIONS and i + 1 < len(words):
            out.add(words[i + 1])
        for opt in OUTPUT_OPTIONS:
            if w.startswith(opt + "=") and opt.startswith("--"):
                out.add(w.split("=", 1)[1])
    return {os.path.normpath(p) for p in out}


def _inputs(words: list[str]) -> list[str]:
    """Path-like words a command reads: not outputs, not the script's own arguments after ``--``."""
    own = words[:words.index("--")] if "--" in words else words
    skip = _outputs(own)
    out = []
    for i, w in enumerate(own):
        if i > 0 and own[i - 1] in OUTPUT_OPTIONS:
            continue
        if _looks_like_path(w) and os.path.normpath(w) not in skip:
            out.append(w)
    return out


def _exists(path: str, made: set[str], root: str) -> bool:
    norm = os.path.normpath(path)
    if norm in made or norm.startswith(("/dev/", "/proc/")):
        return True
    return os.path.exists(path if os.path.isabs(path) else os.path.join(root, path))


def _extras(root: str) -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"].get("optional-dependencies", {}))


def check_command(cmd: Command, made: set[str], root: str = ROOT) -> list[str]:
    """What is wrong with one simple command (empty: nothing); ``made`` gains what it writes."""
    words = tuple(w for w in _env_stripped(cmd.words) if not w.startswith(">"))
    written = {os.path.normpath(w[1:]) for w in cmd.words if w.startswith(">") and not w[1:].isdigit()}
    if not words:
        made.update(written)
        return []
    problems: list[str] = []
    argv = opaudit_argv(words)
    prog = os.path.basename(words[0])
    if argv is not None:
        err = parse_error(argv)
        if err is not None:
            problems.append(f"opaudit's parser refuses it: {err}")
        problems += [f"no such file: {p}" for p in _inputs(argv) if not _exists(p, made, root)]
        made.update(_outputs(argv))
    elif prog in ("python", "python3") or re.fullmatch(r"python3(\.\d+)?", prog):
        problems += _check_python(list(words[1:]), made, root)
    elif prog in ("pip", "pip3"):
        for w in words:
            m = re.fullmatch(r"\.\[([^\]]*)\]", w)
            if m:
                missing = sorted(set(m.group(1).split(",")) - _extras(root))
                problems += [f"no such extra in pyproject.toml: {e}" for e in missing]
    elif prog not in KNOWN_PROGRAMS and not _exists(words[0], made, root):
        problems.append(f"unknown program {words[0]!r} (a typo? else add it to KNOWN_PROGRAMS in scripts/doc_commands.py)")
    elif "/" in words[0] and not _exists(words[0], made, root):
        problems.append(f"no such file: {words[0]}")
    made.update(written)
    return problems


def _check_python(args: list[str], made: set[str], root: str) -> list[str]:
    if args[:2] == ["-m", "pytest"]:
        return [f"no such file: {p.split('::')[0]}" for p in args[2:]
                if not p.startswith("-") and not _exists(p.split("::")[0], made, root)]
    if args and args[0] == "-m":
        return []
    if not args or args[0] == "-c":
        return []
    script = args[0]
    if not _exists(script, made, root):
        return [f"no such file: {script}"]
    with open(os.path.join(root, script), encoding="utf-8") as f:
        source = f.read()
    own = args[1:args.index("--")] if "--" in args else args[1:]
    options = {w.split("=", 1)[0] for w in own if w.startswith("--")}
    return [f"{script} has no option {o}" for o in sorted(options) if f'"{o}"' not in source and f"'{o}'" not in source]


def slug(heading: str, seen: dict[str, int]) -> str:
    """GitHub's anchor for a heading's text (``-1``, ``-2`` for repeats)."""
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    n = seen.get(s, 0)
    seen[s] = n + 1
    return s if n == 0 else f"{s}-{n}"


def anchors(path: str) -> set[str]:
    """The ``#fragment`` names a Markdown file's headings give."""
    with open(path, encoding="utf-8") as f:
        tokens = _tokens(f.read())
    seen: dict[str, int] = {}
    out = set()
    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            inline = tokens[i + 1]
            text = "".join(c.content for c in inline.children or [] if c.type in ("text", "code_inline"))
            out.add(slug(text, seen))
    return out


def links(page: str, root: str = ROOT) -> Iterator[tuple[int, str]]:
    """``(line, target)`` of every link and image of a page."""
    with open(os.path.join(root, page), encoding="utf-8") as f:
        tokens = _tokens(f.read())
    for tok in tokens:
        if tok.type != "inline":
            continue
        line = tok.map[0] + 1 if tok.map else 0
        for child in tok.children or []:
            if child.type == "link_open":
                yield line, str(child.attrs.get("href", ""))
            elif child.type == "image":
                yield line, str(child.attrs.get("src", ""))


def check_links(page: str, root: str = ROOT) -> list[Problem]:
    """Relative links and images that name no file, or no heading of that file."""
    problems = []
    for line, target in links(page, root):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or not target:
            continue
        path, _, fragment = target.partition("#")
        full = os.path.normpath(os.path.join(root, os.path.dirname(page), path)) if path else os.path.join(root, page)
        if not os.path.exists(full):
            problems.append(Problem(page, line, target, f"link to a missing file: {path}"))
        elif fragment and full.endswith(".md") and fragment not in anchors(full):
            problems.append(Problem(page, line, target, f"no heading gives #{fragment} in {os.path.relpath(full, root)}"))
    return problems


def check_page(page: str, root: str = ROOT) -> list[Problem]:
    """Every runnable command of a page, in order (later commands may read what earlier ones wrote), and its links."""
    made: set[str] = set()
    problems: list[Problem] = []
    for line, text, runnable in command_lines(page, root):
        if text.startswith(UNMARKED):
            text = text[len(UNMARKED):]
            problems.append(Problem(page, line, text, "a block of commands without ```bash (or $ prompts): "
                                                      "mark it ```bash so that its commands are checked"))
            continue
        try:
            commands = split_commands(page, line, text)
        except ValueError as e:  # unbalanced quotes
            problems.append(Problem(page, line, text, f"not a shell command: {e}"))
            continue
        for cmd in commands:
            found = check_command(cmd, made, root)
            if runnable:
                problems += [Problem(page, line, text, m) for m in found]
    return problems + check_links(page, root)


def check_all(root: str = ROOT) -> list[Problem]:
    """Every page's problems."""
    return [p for page in pages(root) for p in check_page(page, root)]


def main() -> int:
    """Print every problem; exit 1 when there is one."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    problems = check_all()
    for p in problems:
        print(p)
    n = sum(1 for page in pages() for _, _, runnable in command_lines(page) if runnable)
    print(f"{len(problems)} problem(s) in {n} runnable command line(s) of {len(pages())} page(s)")
    return 1 if problems else 0
