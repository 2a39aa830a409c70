#!/usr/bin/env python3
"""Import cycles in a Rust library crate, between modules and between folders.

    module_cycles.py SRC_DIR        # SRC_DIR/lib.rs is the crate root
    module_cycles.py --self-test

Walks the module tree from lib.rs (`mod name;` declarations), reads every
`crate::`, `super::` and `self::` path outside comments (grouped imports
`crate::{a, b::{c}}` included) and resolves each to the file module that
defines it. A module references another when one of its paths lands there.
Folders are the crate root's children (`crate::http`, `crate::stack`): a
folder references another when any of its modules does. Any cycle, among
modules or among folders, is printed with the lines that make it, and the
exit status is 1. Doc comments are not read: a link in prose is not a use.
"""

import os
import re
import sys
import tempfile

MOD_DECL = re.compile(r"\b(?:pub(?:\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*([;{])")
PATH_START = re.compile(r"(?<![A-Za-z0-9_:])(crate|super|self)::")
IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def strip_comments_and_strings(text):
    """The text with comments and string/char literals blanked, lines kept."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if text.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif text.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "r" and re.match(r'r#*"', text[i:i + 10]) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r'r(#*)"', text[i:]).group(1)
            end = text.find('"' + hashes, i + 2 + len(hashes))
            j = n if end < 0 else end + 1 + len(hashes)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            j += 1
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "'" and re.match(r"'(\\.|[^\\'])'", text[i:i + 4]) or text.startswith("'\\u{", i):
            j = text.find("'", i + 2) + 1
            out.append(" " * (j - i))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_path(text, i):
    """Paths starting at text[i] (after `crate::` etc.): a list of segment lists, and the end."""
    segs = []
    while True:
        m = IDENT.match(text, i)
        if not m:
            break
        segs.append(m.group(0))
        i = m.end()
        k = i
        while k < len(text) and text[k] in " \t\n":
            k += 1
        if not text.startswith("::", k):
            return [segs], i
        i = k + 2
        while i < len(text) and text[i] in " \t\n":
            i += 1
        if i < len(text) and text[i] == "{":
            paths, i = parse_group(text, i + 1)
            return [segs + p for p in paths] or [segs], i
        if i < len(text) and text[i] == "*":
            return [segs], i + 1
    return [segs], i


def parse_group(text, i):
    """`a, b::c, d::{e, f}}` from after a `{`: the paths in it, and the end after `}`."""
    paths = []
    while i < len(text):
        while i < len(text) and text[i] in " \t\n,":
            i += 1
        if i >= len(text):
            break
        if text[i] == "}":
            return paths, i + 1
        if text[i] == "*":
            paths.append([])
            i += 1
            continue
        if text[i] == "{":
            inner, i = parse_group(text, i + 1)
            paths.extend(inner)
            continue
        sub, i = parse_path(text, i)
        paths.extend(sub)
        m = re.match(r"\s+as\s+[A-Za-z_][A-Za-z0-9_]*", text[i:])
        if m:
            i += m.end()
        elif i < len(text) and text[i] not in ",}":
            i += 1  # something unexpected: skip it rather than loop
    return paths, i


class Crate:
    def __init__(self, src):
        self.src = src
        self.files = {}  # module path (tuple) -> file
        self.walk((), os.path.join(src, "lib.rs"), src)

    def walk(self, module, path, child_dir):
        self.files[module] = path
        text = strip_comments_and_strings(open(path, encoding="utf-8").read())
        for m in MOD_DECL.finditer(text):
            if m.group(2) != ";":
                continue  # an inline module belongs to this file
            name = m.group(1)
            for candidate, sub_dir in (
                (os.path.join(child_dir, name + ".rs"), os.path.join(child_dir, name)),
                (os.path.join(child_dir, name, "mod.rs"), os.path.join(child_dir, name)),
            ):
                if os.path.exists(candidate):
                    self.walk(module + (name,), candidate, sub_dir)
                    break
            else:
                sys.exit(f"module_cycles: {path}: mod {name}; has no file")

    def resolve(self, segs):
        """The file module that `segs` (from the crate root) names or lies in."""
        module = ()
        for s in segs:
            if module + (s,) in self.files:
                module = module + (s,)
            else:
                break
        return module

    def references(self):
        """(from module, to module, file, line) for every path that leaves its module."""
        refs = []
        for module, path in self.files.items():
            text = strip_comments_and_strings(open(path, encoding="utf-8").read())
            # Inline modules (`mod tests { use super::*; }`) shift what `super` means.
            inline = []  # brace depth at which each open inline module closes
            depth = 0
            events = [(m.start(), "mod", m) for m in MOD_DECL.finditer(text) if m.group(2) == "{"]
            events += [(m.start(), "path", m) for m in PATH_START.finditer(text)]
            events += [(i, c, None) for i, c in enumerate(text) if c in "{}"]
            events.sort(key=lambda e: (e[0], e[1] != "mod"))
            skip_brace = set()
            for pos, kind, m in events:
                if kind == "mod":
                    brace = m.end() - 1
                    skip_brace.add(brace)
                    depth += 1
                    inline.append(depth)
                elif kind == "{":
                    if pos not in skip_brace:
                        depth += 1
                elif kind == "}":
                    if inline and inline[-1] == depth:
                        inline.pop()
                    depth -= 1
                else:
                    head = m.group(1)
                    here = module + tuple("<inline>" for _ in inline)
                    line = text.count("\n", 0, pos) + 1
                    for segs in parse_path(text, m.end())[0]:
                        if head == "crate":
                            full = segs
                        else:
                            base = list(here)
                            rest = list(segs)
                            if head == "super":
                                base = base[:-1]
                            while rest and rest[0] == "super":
                                base, rest = base[:-1], rest[1:]
                            if "<inline>" in base:
                                continue  # within this file's own inline modules
                            full = base + rest
                        target = self.resolve(full)
                        if target != module:
                            refs.append((module, target, path, line))
        return refs


def cycles(edges):
    """Strongly connected components of more than one node (Tarjan)."""
    graph = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, on, stack, out = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def name(module):
    return "crate::" + "::".join(module) if module else "crate"


def check(src, out=sys.stdout):
    crate = Crate(src)
    refs = crate.references()
    found = 0
    module_edges = {(a, b): (f, l) for a, b, f, l in reversed(refs)}
    # The crate root and folder mod.rs files only declare and re-export.
    for comp in cycles([e for e in module_edges if e[0] and e[1]]):
        found += 1
        print(f"import cycle between modules: {', '.join(name(m) for m in comp)}", file=out)
        for (a, b), (f, l) in sorted(module_edges.items()):
            if a in comp and b in comp:
                print(f"  {name(a)} -> {name(b)}  ({os.path.relpath(f, src)}:{l})", file=out)
    folder_edges = {}
    for a, b, f, l in reversed(refs):
        if a and b and a[0] != b[0]:
            folder_edges[(a[0], b[0])] = (name(a), name(b), f, l)
    for comp in cycles(folder_edges):
        found += 1
        print(f"import cycle between folders: {', '.join(comp)}", file=out)
        for (a, b), (ma, mb, f, l) in sorted(folder_edges.items()):
            if a in comp and b in comp:
                print(f"  {a} -> {b}: {ma} -> {mb}  ({os.path.relpath(f, src)}:{l})", file=out)
    return found


SELF_TEST = {
    # name: (files, expected cycle lines)
    "acyclic": ({
        "lib.rs": "pub mod low;\npub mod high;\n",
        "low/mod.rs": "//! uses crate::high in prose only\npub mod a;\npub mod b;\n",
        "low/a.rs": "pub struct A;\n",
        "low/b.rs": "use super::a::A;\n/* crate::high::H */\nconst S: &str = \"crate::high\";\npub fn b(_: A) {}\n",
        "high/mod.rs": "pub mod h;\n",
        "high/h.rs": "use crate::low::{a::A, b};\npub struct H(A);\n#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::h::H;\n}\n",
    }, []),
    "module cycle": ({
        "lib.rs": "mod a;\nmod b;\n",
        "a.rs": "use crate::b::B;\npub struct A;\n",
        "b.rs": "pub struct B(crate::a::A);\n",
    }, ["import cycle between modules: crate::a, crate::b",
        # A module at the crate root counts as a folder of its own.
        "import cycle between folders: a, b"]),
    "cycle through a group and super": ({
        "lib.rs": "mod f;\n",
        "f/mod.rs": "pub mod x;\npub mod y;\n",
        "f/x.rs": "use crate::f::{y::{Y}, x as _};\npub struct X;\n",
        "f/y.rs": "pub struct Y(super::x::X);\n",
    }, ["import cycle between modules: crate::f::x, crate::f::y"]),
    "folder cycle": ({
        "lib.rs": "pub mod low;\npub mod high;\n",
        "low/mod.rs": "pub mod a;\npub mod b;\n",
        "low/a.rs": "pub struct A;\n",
        "low/b.rs": "pub fn b(_: crate::high::h::H) {}\n",
        "high/mod.rs": "pub mod h;\n",
        "high/h.rs": "pub struct H(crate::low::a::A);\n",
    }, ["import cycle between folders: high, low"]),
}


def self_test():
    failed = 0
    for label, (files, expected) in SELF_TEST.items():
        with tempfile.TemporaryDirectory() as src:
            for rel, text in files.items():
                path = os.path.join(src, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", encoding="utf-8") as f:
                    f.write(text)

            class Lines:
                def __init__(self):
                    self.text = ""

                def write(self, s):
                    self.text += s

            got = Lines()
            check(src, out=got)
            headers = [line for line in got.text.splitlines() if line.startswith("import cycle")]
            if headers != expected:
                failed += 1
                print(f"self-test {label!r}: expected {expected}, got:\n{got.text}")
    if failed:
        sys.exit("module_cycles: self-test failed")
    print(f"module_cycles self-test: {len(SELF_TEST)} cases ok")


if __name__ == "__main__":
    if sys.argv[1:] == ["--self-test"]:
        self_test()
    elif len(sys.argv) == 2:
        n = check(sys.argv[1])
        if n:
            sys.exit(f"{n} import cycle(s) in {sys.argv[1]}")
        print(f"no import cycles in {sys.argv[1]}")
    else:
        sys.exit(__doc__)
