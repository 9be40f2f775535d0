"""The engine step's structure, checked on the source (AST) so it cannot regress: a sequence's fields
are written only in sequence.py, the scheduler and the block manager; nothing sets an attribute on the
model runner from outside it; the runner calls nothing back."""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
ENGINE = ROOT / "cir" / "engine"
WRITERS = {"sequence.py", "scheduler.py", "scheduler_stream.py", "block_manager.py"}
MUTATORS = {"append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse", "__setitem__"}
C_WRITES = {"setattr", "setitem", "append", "extend"}  # map(<one of these>, ...) writes into its arguments


def sequence_fields() -> set[str]:
    tree = ast.parse((ENGINE / "sequence.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Sequence")
    init = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    return {t.attr for n in ast.walk(init) if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def _field_of(node: ast.AST, fields: set[str]) -> str | None:
    """`x.field` (x not a bare `self`: another class's own attribute of the same name is not a
    sequence's), or `x.field[...]`."""
    if isinstance(node, ast.Subscript):
        node = node.value
    is_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    if isinstance(node, ast.Attribute) and node.attr in fields and not is_self:
        return node.attr
    return None


def _name(node: ast.AST) -> str:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""


def writes(source: str, fields: set[str]) -> list[str]:
    """Every write of a sequence field in `source`: assignments, mutating calls on a field,
    `setattr(x, "field", ...)`, and C-level `map` writes (setattr / setitem / list.append / list.extend)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for t in ast.walk(target) if isinstance(target, ast.Tuple) else [target]:
                if _field_of(t, fields):
                    found.append(f"line {node.lineno}: assigns .{_field_of(t, fields)}")
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in MUTATORS and _field_of(func.value, fields):
                found.append(f"line {node.lineno}: .{_field_of(func.value, fields)}.{func.attr}()")
            name = _name(func)
            if name == "setattr" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) \
                    and node.args[1].value in fields:
                found.append(f"line {node.lineno}: setattr .{node.args[1].value}")
            if name == "map" and node.args:
                writer = _name(node.args[0])
                if writer in C_WRITES:
                    found.append(f"line {node.lineno}: map({writer}, ...)")
    return found


def test_the_scan_finds_every_kind_of_write():
    fields = sequence_fields()
    assert {"token_ids", "num_cached_tokens", "loss_mask", "logprobs", "status", "block_table"} <= fields
    source = """
seq.num_cached_tokens = 3
seq.status, other = 1, 2
seq.scan_offset += 1
seq.block_table[0] = 4
seq.token_ids.append(-1)
setattr(seq, "finish_reason", "eos")
consume(map(list.append, lists, repeat(-1)))
consume(map(setitem, lists, repeat(-1), tokens))
self.status = 0
x = seq.token_ids[-1]
"""
    assert len(writes(source, fields)) == 8


@pytest.mark.parametrize("path", sorted(ENGINE.glob("*.py")), ids=lambda p: p.name)
def test_sequence_fields_are_written_only_by_sequence_scheduler_and_block_manager(path):
    if path.name in WRITERS:
        return
    assert writes(path.read_text(), sequence_fields()) == [], f"{path.name} writes a sequence field"


def test_sequences_do_not_leave_the_engine_package():
    # (so the scan above, over cir/engine, sees every place that could write one: generate returns
    # Trajectory objects; a tokenizer's `.decoder` elsewhere is not a sequence's)
    for path in (ROOT / "cir").rglob("*.py"):
        if path.parent != ENGINE:
            assert "engine.sequence" not in path.read_text(), path


def test_nothing_sets_a_model_runner_attribute_from_outside_and_no_callback():
    for path in (ROOT / "cir").rglob("*.py"):
        if path.name == "model_runner.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for t in ast.walk(target):
                        assert not (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Attribute)
                                    and t.value.attr == "runner"), f"{path.name}:{node.lineno} sets runner.{t.attr}"
    runner = (ENGINE / "model_runner.py").read_text()
    assert "on_launch" not in runner and "callback" not in runner


def test_the_engine_step_is_schedule_run_postprocess():
    tree = ast.parse((ENGINE / "engine.py").read_text())
    loop = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "_loop")
    calls = [n.func.attr for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert {"schedule", "run", "postprocess"} <= set(calls)
