"""Mutation testing of one module: AST mutants, the chosen tests run on each in a forked child (torch and Lightning
imported once, so a mutant costs its tests, not a fresh start-up). It rewrites MODULE in place (restored at the end):
run it in a scratch copy of the repository, e.g. ``git worktree add /tmp/mm`` or ``git archive HEAD | tar -x -C DIR``.

    [ONLY=k,k,...] python scripts/mutate.py project/checkpoint_io.py OUT.json -- tests/test_faults.py -k checkpoint

Operators: comparison flips, and<->or, ``not x`` -> x, + <-> -, * <-> /, // -> /, a number n -> n+1, True<->False,
plain strings -> "XX" (not docstrings or f-strings), ``return x`` -> ``return None``, a call statement -> pass,
``if c`` -> ``if not c``. ``ONLY`` re-runs the listed mutants (an earlier run's survivors). The runs on checkpoint_io,
nan_guard, prediction_writer, data/batches and data/base, with their figures: the commit message that added this.
"""

import ast
import json
import os
import signal
import sys
import time

sys.dont_write_bytecode = True

CMP = {
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
}
BIN = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div}


def docstring_ids(tree):
    ids = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body:
            first = n.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    for n in ast.walk(tree):
        if isinstance(n, ast.JoinedStr):
            for v in ast.walk(n):
                ids.add(id(v))
    return ids


def sites(tree):
    """(node, kind) for each possible mutation, in walk order."""
    skip = docstring_ids(tree)
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Compare):
            for i, op in enumerate(n.ops):
                if type(op) in CMP:
                    out.append((n, ("cmp", i)))
        elif isinstance(n, ast.BoolOp):
            out.append((n, ("boolop",)))
        elif isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.Not):
            out.append((n, ("not",)))
        elif isinstance(n, ast.BinOp) and type(n.op) in BIN:
            out.append((n, ("bin",)))
        elif isinstance(n, ast.Constant) and id(n) not in skip:
            v = n.value
            if isinstance(v, bool) or (isinstance(v, int) and not isinstance(v, bool)) or isinstance(v, float):
                out.append((n, ("const",)))
            elif isinstance(v, str):
                out.append((n, ("str",)))
        elif (
            isinstance(n, ast.Return)
            and n.value is not None
            and not (isinstance(n.value, ast.Constant) and n.value.value is None)
        ):
            out.append((n, ("return",)))
        elif isinstance(n, ast.Expr) and isinstance(n.value, ast.Call):
            out.append((n, ("drop",)))
        elif isinstance(n, (ast.If, ast.While)):
            out.append((n, ("negate",)))
    return out


def mutate(src, k):
    tree = ast.parse(src)
    node, kind = sites(tree)[k]
    desc = f"line {node.lineno}: "
    if kind[0] == "cmp":
        i = kind[1]
        old = type(node.ops[i])
        node.ops[i] = CMP[old]()
        desc += f"{old.__name__} -> {CMP[old].__name__}"
    elif kind[0] == "boolop":
        old = type(node.op)
        node.op = ast.Or() if old is ast.And else ast.And()
        desc += f"{old.__name__} -> {type(node.op).__name__}"
    elif kind[0] == "not":
        repl = node.operand
        desc += "not x -> x"
        node.__class__ = repl.__class__
        node.__dict__.update(repl.__dict__)
    elif kind[0] == "bin":
        old = type(node.op)
        node.op = BIN[old]()
        desc += f"{old.__name__} -> {BIN[old].__name__}"
    elif kind[0] == "const":
        v = node.value
        node.value = (not v) if isinstance(v, bool) else v + 1
        desc += f"{v!r} -> {node.value!r}"
    elif kind[0] == "str":
        desc += f"{node.value!r} -> 'XX'"
        node.value = "XX"
    elif kind[0] == "return":
        desc += f"return {ast.unparse(node.value)[:40]} -> return None"
        node.value = ast.Constant(None)
    elif kind[0] == "drop":
        desc += f"{ast.unparse(node)[:50]} -> pass"
        node.__class__ = ast.Pass
        node.__dict__ = {"lineno": node.lineno, "col_offset": node.col_offset}
    elif kind[0] == "negate":
        desc += f"if {ast.unparse(node.test)[:40]} -> if not (...)"
        node.test = ast.UnaryOp(ast.Not(), node.test)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree), desc


def run_tests(args, timeout):
    pid = os.fork()
    if pid == 0:
        os.setsid()
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        import pytest

        code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "-n", "0", *args])
        os._exit(int(code))
    start = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), time.time() - start
        if time.time() - start > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout", time.time() - start
        time.sleep(0.05)


def main():
    module, out = sys.argv[1], sys.argv[2]
    args = sys.argv[sys.argv.index("--") + 1 :]
    only = os.environ.get("ONLY")  # comma-separated mutant numbers (k) to run: the survivors of an earlier run
    only = {int(k) for k in only.split(",")} if only else None
    import lightning  # noqa: F401  # heavy imports once, before forking
    import torch
    import torchvision  # noqa: F401

    torch.set_num_threads(1)
    original = open(module).read()
    base = ast.unparse(ast.parse(original))
    n = len(sites(ast.parse(original)))
    results = []
    try:
        open(module, "w").write(base)
        code, t = run_tests(args, 600)
        assert code == 0, f"tests fail on the unmutated (unparsed) module: {code}"
        timeout = max(10, 3 * t)
        print(f"{module}: {n} mutants, baseline {t:.1f}s, timeout {timeout:.0f}s", flush=True)
        for k in range(n):
            src, desc = mutate(original, k)
            if src == base or (only is not None and k not in only):
                continue
            open(module, "w").write(src)
            code, t = run_tests(args, timeout)
            status = "survived" if code == 0 else "killed"
            results.append({"k": k, "desc": desc, "status": status, "code": code, "t": round(t, 1)})
            print(f"[{k + 1}/{n}] {status:8} {desc} ({t:.1f}s)", flush=True)
    finally:
        open(module, "w").write(original)
    json.dump(results, open(out, "w"), indent=1)
    killed = sum(r["status"] == "killed" for r in results)
    print(f"TOTAL {len(results)} killed {killed} survived {len(results) - killed}")


if __name__ == "__main__":
    main()
