"""The documentation stands on its own: every relative link in README.md and docs/*.md resolves inside
the repository (file and, for a Markdown target, #section), and no file cites the design note that lived outside it (../shared/DESIGN.md).
Fast: text only, no model."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images are not links here
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, each space a hyphen."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    out, seen = set(), {}
    for h in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        s = slug(h)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", path.read_text(encoding="utf-8")))


def test_the_docs_exist():
    for name in ("architecture.md", "formats.md", "benchmarks.md", "LOG.md"):
        assert (ROOT / "docs" / name).is_file(), name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path):
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: … are not ours to check
            continue
        file, _, anchor = target.partition("#")
        dest = (doc.parent / file).resolve() if file else doc
        if not dest.is_relative_to(ROOT):
            bad.append(f"{target}: outside the repository")
        elif not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no section #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_readme_points_to_the_design_docs():
    targets = {t.partition("#")[0] for t in links(ROOT / "README.md")}
    assert {"docs/architecture.md", "docs/formats.md", "docs/benchmarks.md", "docs/LOG.md"} <= targets


def test_no_reference_to_a_design_note_outside_the_repository():
    files = [*DOCS, *(ROOT / "alignloop").rglob("*.py"), *(ROOT / "tests").glob("*.py"),
             *(ROOT / "scripts").glob("*"), *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "experiments").glob("*.py")]
    me = Path(__file__).resolve()
    hits = [f"{f.relative_to(ROOT)}:{i}" for f in files if f.is_file() and f.resolve() != me
            for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
            if "DESIGN.md" in line]
    assert not hits, "cites a file outside the repository: " + ", ".join(hits)


# ---------------------------------------------------------------- command lines quoted in docs/benchmarks.md

SPAN = re.compile(r"(?<!`)`([^`]+)`(?!`)")                  # an inline code span (may wrap a line)
COMMAND = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)*(python (?:benchmarks|experiments)/\S+\.py\b.*|alignloop\s.*|alignloop)$")


def quoted_commands(path: Path) -> list[str]:
    """Every command line `python benchmarks/…`, `python experiments/…` or `alignloop …` in a code span or
    a fenced code block of `path`, as one line (a span or a `\\`-continued line may wrap), environment
    assignments before it dropped; `a; b` and `a && b` are two commands."""
    text = path.read_text(encoding="utf-8")
    chunks = [m.group(0) for m in FENCE.finditer(text)]
    blocks = [line for c in chunks for line in re.sub(r"\\\n", " ", c).splitlines()[1:-1]]
    chunks = blocks + SPAN.findall(FENCE.sub("", text))
    out = []
    for chunk in chunks:
        for part in re.split(r"\s*(?:;|&&)\s*", " ".join(chunk.split())):
            m = COMMAND.match(part.lstrip("$ "))
            if m and m.group(1) not in out:
                out.append(m.group(1))
    return out


class _Parser(Exception):
    """Raised by a patched parse_args to hand back the parser a script's main() built, before any work."""


def _parser_of(main) -> argparse.ArgumentParser:
    real = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _Parser(self)
    argparse.ArgumentParser.parse_args = capture
    try:
        main()
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = real
    raise AssertionError(f"{main} returned without parsing its arguments")


def _argv(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """The words as a user types them: `[...]` optional parts included, `…` (elided) dropped, `$(…)` a
    file, and a placeholder in capitals (N, B, COPY) after a flag given a value that flag accepts."""
    out = []
    for w in words:
        w = w.strip("[]")
        if w in ("", "…", "..."):
            continue
        action = parser._option_string_actions.get(out[-1]) if out else None
        if action is not None and action.nargs != 0 and re.fullmatch(r"[A-Z][A-Z0-9_]*", w):
            if action.choices:
                w = str(next(iter(action.choices)))
            elif action.type in (int, float) or action.metavar in ("INT", "FLOAT"):
                w = "1"
        out.append(w)
    return out


def parse_quoted(command: str) -> str | None:
    """None when the command line parses with its script's own argparse (and, for a stage, its config
    resolves), else what argparse or the config said."""
    import contextlib
    import importlib
    import io
    import shlex
    import sys
    words = shlex.split(re.sub(r"\$\([^)]*\)", "MODEL.gguf", command))
    err, path_before, modules_before = io.StringIO(), list(sys.path), set(sys.modules)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if words[0] == "python":
                path = ROOT / words[1]
                if not path.is_file():
                    return f"no such script {words[1]}"
                sys.path.insert(0, str(path.parent))          # as `python SCRIPT` has it (benchmarks/data.py)
                spec = importlib.util.spec_from_file_location(f"_quoted_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                parser = _parser_of(module.main)
                parser.parse_args(_argv(parser, words[2:]))
                return None
            from alignloop import config as C
            from alignloop.cli import COMMANDS, stage_parser
            if len(words) == 1 or words[1] not in COMMANDS:
                return f"no such command {' '.join(words[:2])!r}"
            if len(words) == 2:
                return None                                    # the command named in prose, no flags to check
            module = importlib.import_module(COMMANDS[words[1]][0])
            if not hasattr(module, "Config"):                  # chat, serve, label: a main(argv) of their own
                parser = _parser_of(lambda: module.main([]))
                parser.parse_args(_argv(parser, words[2:]))
                return None
            parser = stage_parser(words[1], module)
            args = parser.parse_args(_argv(parser, words[2:]) + (["--loop-only"] if words[1] == "loop" else []))
            C.resolve(module.Config, module.SECTION, preset=args.preset or "tiny", presets=module.PRESETS,
                      toml=args.config, flags=C.flags_from_args(args, module.Config))
            return None
    except SystemExit:
        return (err.getvalue().strip().splitlines() or ["exit"])[-1]
    except Exception as e:  # noqa: BLE001 (the config's InputError, an import error: all are failures here)
        return f"{type(e).__name__}: {e}"
    finally:  # leave no script folder on sys.path and none of their modules (`data`) in sys.modules
        sys.path[:] = path_before
        for name in set(sys.modules) - modules_before:
            if Path(getattr(sys.modules[name], "__file__", None) or "/").parent in (ROOT / "benchmarks", ROOT / "experiments"):
                del sys.modules[name]


BENCHMARK_COMMANDS = quoted_commands(ROOT / "docs" / "benchmarks.md")


def test_benchmarks_md_quotes_commands():
    assert len(BENCHMARK_COMMANDS) >= 20, BENCHMARK_COMMANDS      # the extraction finds them at all
    assert "python benchmarks/step_profile.py --size tiny --batch 64 --new 48" in BENCHMARK_COMMANDS


def test_the_checker_refuses_what_does_not_parse():
    assert parse_quoted("python benchmarks/step_profile.py --size tiny --batch 64 --new 48") is None
    assert "unrecognized arguments: --no-such-flag" in parse_quoted("python benchmarks/step_profile.py --no-such-flag")
    assert "invalid int value" in parse_quoted("python benchmarks/step_profile.py --batch many")
    assert parse_quoted("alignloop ppo --preset tiny --iterations 8") is None
    assert "iterations" in parse_quoted("alignloop ppo --preset tiny --iterations eight")
    assert "no such command" in parse_quoted("alignloop frobnicate --preset tiny")
    assert "no such script" in parse_quoted("python benchmarks/nothing_here.py")


@pytest.mark.parametrize("command", BENCHMARK_COMMANDS, ids=lambda c: c if len(c) <= 100 else c[:99] + "…")
def test_commands_quoted_in_benchmarks_md_parse(command):
    problem = parse_quoted(command)
    assert problem is None, f"docs/benchmarks.md quotes `{command}`: {problem}"


def test_docs_paths_cited_in_code_exist():
    """`docs/<name>.md` in a docstring or comment names a file that is there."""
    cited = {m for f in (ROOT / "alignloop").rglob("*.py")
             for m in re.findall(r"docs/[\w.-]+\.md", f.read_text(encoding="utf-8"))}
    missing = sorted(c for c in cited if not (ROOT / c).is_file())
    assert not missing, missing
