"""
The ``vboxapi`` stand-in serves nothing that VirtualBox's API lacks: every attribute and method
it serves exists, under that name and with that number of arguments, in pyvbox's generated
``virtualbox/library.py`` (generated from VirtualBox.xidl), in the interface it stands for.
"""

from __future__ import annotations

import ast
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

import pytest

STANDIN = Path(__file__).resolve().parents[1] / "standins" / "vboxapi" / "__init__.py"


@dataclass
class Interface:
    bases: list[str]
    methods: dict[str, int] = field(default_factory=dict)  # XIDL name -> number of arguments
    readable: set[str] = field(default_factory=set)
    writable: set[str] = field(default_factory=set)


def pyvbox_api() -> dict[str, Interface]:
    """What pyvbox's library.py asks of each COM interface, read from its source."""
    spec = importlib.util.find_spec("virtualbox.library")
    assert spec is not None and spec.origin is not None
    tree = ast.parse(Path(spec.origin).read_text())
    interfaces: dict[str, Interface] = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        interface = interfaces[node.name] = Interface([b.id for b in node.bases if isinstance(b, ast.Name)])
        for call in ast.walk(node):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.args):
                continue
            first = call.args[0]
            if not (isinstance(first, ast.Constant) and isinstance(first.value, str)):
                continue
            if call.func.attr == "_call":
                in_p = next((k.value for k in call.keywords if k.arg == "in_p"), None)
                count = len(in_p.elts) if isinstance(in_p, ast.List) else 0
                interface.methods[first.value] = count
            elif call.func.attr == "_get_attr":
                interface.readable.add(first.value)
            elif call.func.attr == "_set_attr":
                interface.writable.add(first.value)
    return interfaces


def merged(api: dict[str, Interface], name: str) -> Interface:
    """An interface with everything it inherits (IMachineStateChangedEvent from IEvent...)."""
    interface = api[name]
    result = Interface([], dict(interface.methods), set(interface.readable), set(interface.writable))
    for base in interface.bases:
        if base in api:
            inherited = merged(api, base)
            result.methods = {**inherited.methods, **result.methods}
            result.readable |= inherited.readable
            result.writable |= inherited.writable
    return result


@dataclass
class Served:
    methods: dict[str, int] = field(default_factory=dict)
    readable: set[str] = field(default_factory=set)
    writable: set[str] = field(default_factory=set)


def served_by(source: str) -> dict[str, tuple[tuple[str, ...], Served]]:
    """What each stand-in class serves: its public methods (with their number of arguments),
    its public attributes (class-level, properties, ``self.x = ...``) and which of them are
    settable; classes inherit from the stand-in's own base classes."""
    tree = ast.parse(source)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}

    def serve(node: ast.ClassDef) -> tuple[tuple[str, ...], Served]:
        interfaces: tuple[str, ...] = ()
        served = Served()
        for base in node.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                base_interfaces, inherited = serve(classes[base.id])
                interfaces = interfaces or base_interfaces
                served.methods.update(inherited.methods)
                served.readable |= inherited.readable
                served.writable |= inherited.writable
        for item in node.body:
            if isinstance(item, ast.Assign | ast.AnnAssign):
                targets = item.targets if isinstance(item, ast.Assign) else [item.target]
                for target in targets:
                    if isinstance(target, ast.Name) and target.id == "_interfaces":
                        interfaces = tuple(ast.literal_eval(item.value))  # type: ignore[arg-type]
                    elif isinstance(target, ast.Name) and not target.id.startswith("_"):
                        served.readable.add(target.id)
                        value = item.value
                        if (
                            isinstance(value, ast.Call)
                            and isinstance(value.func, ast.Name)
                            and value.func.id in ("property", "_setting")
                            and (len(value.args) >= 2 or value.func.id == "_setting")
                        ):
                            served.writable.add(target.id)
            elif isinstance(item, ast.FunctionDef):
                decorators = [ast.unparse(d) for d in item.decorator_list]
                if item.name.startswith("_"):
                    for sub in ast.walk(item):
                        if (
                            isinstance(sub, ast.Attribute)
                            and isinstance(sub.value, ast.Name)
                            and sub.value.id == "self"
                            and isinstance(sub.ctx, ast.Store)
                            and not sub.attr.startswith("_")
                        ):
                            served.readable.add(sub.attr)
                    continue
                if "property" in decorators:
                    served.readable.add(item.name)
                elif any(d.endswith(".setter") for d in decorators):
                    served.writable.add(item.name)
                else:
                    served.methods[item.name] = len(item.args.args) - 1
        return interfaces, served

    return {name: serve(node) for name, node in classes.items()}


def invented(source: str) -> list[str]:
    """Everything the stand-in ``source`` serves that pyvbox's API lacks."""
    api = pyvbox_api()
    problems = []
    for cls, (interfaces, served) in served_by(source).items():
        if cls.startswith("_") or not interfaces:
            continue
        for interface_name in interfaces:
            if interface_name not in api:
                problems.append(f"{cls}: no interface {interface_name} in pyvbox")
                continue
            interface = merged(api, interface_name)
            for method, count in served.methods.items():
                if method not in interface.methods:
                    problems.append(f"{cls}.{method}(): {interface_name} has no such method")
                elif interface.methods[method] != count:
                    problems.append(
                        f"{cls}.{method}(): takes {count} arguments, {interface_name} takes "
                        f"{interface.methods[method]}"
                    )
            for attribute in served.readable - set(served.methods):
                if attribute not in interface.readable:
                    problems.append(f"{cls}.{attribute}: {interface_name} has no such attribute")
            for attribute in served.writable:
                if attribute not in interface.writable:
                    problems.append(f"{cls}.{attribute}: {interface_name} does not let it be set")
    return problems


def test_the_vboxapi_standin_serves_only_pyvbox_api():
    assert invented(STANDIN.read_text()) == []


def test_the_standin_serves_something_of_each_interface_it_claims():
    served = served_by(STANDIN.read_text())
    claimed = {i for interfaces, _ in served.values() for i in interfaces}
    assert {
        "IVirtualBox",
        "IMachine",
        "ISession",
        "IConsole",
        "IProgress",
        "IEventSource",
        "ISnapshot",
    } <= claimed


@pytest.mark.parametrize(
    ("source", "problem"),
    [
        (
            'class IMachine:\n    _interfaces = ("IMachine",)\n    def powerUp(self): ...\n',
            "IMachine has no such method",
        ),
        (
            'class IMachine:\n    _interfaces = ("IMachine",)\n    def lockMachine(self, session): ...\n',
            "takes 1 arguments, IMachine takes 2",
        ),
        (
            'class IConsole:\n    _interfaces = ("IConsole",)\n    colour = "blue"\n',
            "IConsole has no such attribute",
        ),
        (
            'class IMachine:\n    _interfaces = ("IMachine",)\n'
            "    state = property(lambda s: 1, lambda s, v: None)\n",
            "IMachine does not let it be set",
        ),
        (
            'class IProgress:\n    _interfaces = ("IProgress",)\n'
            "    def __init__(self):\n        self.speed = 1\n",
            "no such attribute",
        ),
    ],
)
def test_the_check_catches_invented_api(source, problem):
    assert any(problem in p for p in invented(source)), invented(source)
