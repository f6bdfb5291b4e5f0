"""YAML recipes: parse, resolve ``${step}`` references, validate everything before running.

A recipe::

    workdir: runs/example          # optional; default runs/<recipe file stem>
    steps:
      - name: tok                  # unique; the step's output is <workdir>/<name>
        step: tokenizer            # the step kind (a CLI verb)
        vocab_size: 4096           # every other key is an option of that verb
      - name: teacher
        step: train
        tokenizer: ${tok}          # the output of an earlier (or any other) step
        model: ${vars.preset}      # a recipe variable: `vars: {preset: micro}`; --set vars.preset=nano

A step marked ``optional: true`` runs only while another step refers to it. A recipe can
thus default an input to a step of its own (``vars: {model: ${base}}``, where ``base``
trains a small model) and drop that step when ``--set vars.model=DIR`` supplies one.

Errors name the file, the line and the field: an unknown step kind, a bad option (checked
by the verb's own pydantic model), a reference to an undefined step, a duplicate name, or a
cycle. Nothing runs until the whole recipe is valid.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmkit.errors import ConfigError
from slmkit.pipeline.steps import PLANNED, STEP_KINDS

REF = re.compile(r"\$\{([A-Za-z_][\w\-]*)\}")
VAR = re.compile(r"\$\{vars\.([A-Za-z_][\w\-]*)\}")
_RESERVED = {"name", "step", "optional"}


@dataclass
class Step:
    """One validated recipe step."""

    name: str
    kind: str
    options: dict[str, Any]          # raw options, references unresolved
    line: int                        # 1-based line of the step in the recipe
    option_lines: dict[str, int] = field(default_factory=dict)
    deps: list[str] = field(default_factory=list)
    optional: bool = False           # runs only while another step refers to it


@dataclass
class Recipe:
    path: Path
    workdir: Path
    steps: list[Step]                # in execution (topological) order

    def out_dir(self, name: str) -> Path:
        return self.workdir / name


def _err(path: Path, line: int, msg: str) -> ConfigError:
    return ConfigError(f"{path}:{line}: {msg}")


def _node_lines(node: yaml.MappingNode) -> dict[str, int]:
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def load_recipe(path: str | Path, workdir: str | Path | None = None,
                overrides: list[str] | None = None) -> Recipe:
    """Parse and fully validate a recipe file.

    Args:
        path: the YAML recipe.
        workdir: overrides the recipe's ``workdir``.
        overrides: ``step.field=value`` items (YAML values) applied on top of the file,
            e.g. ``teacher.max_steps=5``.

    Raises:
        ConfigError: ``file:line: message`` for the first problem found.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Recipe '{path}' does not exist; pass the path of a YAML recipe "
                          "(see the recipes/ folder).")
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise _err(path, line, f"invalid YAML ({problem}); fix the syntax.") from None
    if not isinstance(data, dict) or not isinstance(root, yaml.MappingNode):
        raise _err(path, 1, "a recipe is a mapping with a 'steps' list; see recipes/quickstart.yaml.")
    top_lines = _node_lines(root)
    unknown_top = set(data) - {"workdir", "steps", "description", "vars"}
    if unknown_top:
        key = sorted(unknown_top)[0]
        raise _err(path, top_lines[key], f"unknown top-level field '{key}'; use workdir, "
                   "description, vars and steps.")
    variables = data.get("vars") or {}
    if not isinstance(variables, dict):
        raise _err(path, top_lines.get("vars", 1), "'vars' must be a mapping of name: value.")
    overrides = list(overrides or [])
    for item in [o for o in overrides if o.strip().startswith("vars.")]:
        key, _, raw = item.strip()[len("vars."):].partition("=")
        variables[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        overrides.remove(item)
    steps_node = next((v for k, v in root.value if k.value == "steps"), None)
    if not isinstance(data.get("steps"), list) or not data["steps"]:
        raise _err(path, top_lines.get("steps", 1), "'steps' must be a non-empty list of steps.")

    steps: list[Step] = []
    seen: dict[str, int] = {}
    for raw, node in zip(data["steps"], steps_node.value):
        line = node.start_mark.line + 1
        if not isinstance(raw, dict):
            raise _err(path, line, "each step is a mapping with 'name' and 'step' fields.")
        lines = _node_lines(node)
        name, kind = raw.get("name"), raw.get("step")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w\-]*", name or ""):
            raise _err(path, lines.get("name", line), "every step needs a 'name' made of letters, "
                       "digits, '_' or '-'.")
        if name in seen:
            raise _err(path, lines.get("name", line), f"step name '{name}' is already used on "
                       f"line {seen[name]}; names must be unique.")
        seen[name] = line
        if kind not in STEP_KINDS:
            where = lines.get("step", line)
            if kind in PLANNED:
                raise _err(path, where, f"step '{name}': kind '{kind}' is not available in this "
                           f"slmkit version; available: {', '.join(STEP_KINDS)}.")
            raise _err(path, where, f"step '{name}': unknown step kind '{kind}'; use one of "
                       f"{', '.join(STEP_KINDS)}.")
        optional = raw.get("optional", False)
        if not isinstance(optional, bool):
            raise _err(path, lines.get("optional", line), f"step '{name}': 'optional' must be "
                       "true or false.")
        options = {k: _substitute_vars(v, variables, path, lines.get(k, line), name, k)
                   for k, v in raw.items() if k not in _RESERVED}
        steps.append(Step(name, kind, options, line, lines, optional=optional))

    _apply_overrides(path, steps, overrides)
    names = {s.name for s in steps}
    for s in steps:
        for key, value in s.options.items():
            for ref in _refs(value):
                if ref not in names:
                    raise _err(path, s.option_lines.get(key, s.line),
                               f"step '{s.name}', field '{key}': ${{{ref}}} names no step in "
                               "this recipe.")
                if ref == s.name:
                    raise _err(path, s.option_lines.get(key, s.line),
                               f"step '{s.name}', field '{key}' refers to the step itself.")
                if ref not in s.deps:
                    s.deps.append(ref)
    ordered = _toposort(_drop_unused(steps), path)
    wd = Path(workdir) if workdir else Path(data.get("workdir") or f"runs/{path.stem}")
    recipe = Recipe(path, wd, ordered)
    for s in ordered:
        validate_step(recipe, s)
    return recipe


def _substitute_vars(value: Any, variables: dict[str, Any], path: Path, line: int, step: str,
                     key: str) -> Any:
    """Replace ``${vars.NAME}``: a whole-string reference keeps the variable's type."""
    if isinstance(value, dict):
        return {k: _substitute_vars(v, variables, path, line, step, key) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_vars(v, variables, path, line, step, key) for v in value]
    if not isinstance(value, str):
        return value
    for name in VAR.findall(value):
        if name not in variables:
            raise _err(path, line, f"step '{step}', field '{key}': ${{vars.{name}}} is not "
                       "defined under vars.")
    whole = VAR.fullmatch(value)
    if whole:
        return variables[whole.group(1)]
    return VAR.sub(lambda m: str(variables[m.group(1)]), value)


def _apply_overrides(path: Path, steps: list[Step], overrides: list[str]) -> None:
    by_name = {s.name: s for s in steps}
    for item in overrides:
        target, sep, raw = item.partition("=")
        name, dot, key = target.strip().partition(".")
        if not sep or not dot or not key:
            raise ConfigError(f"--set '{item}' is not step.field=value; write e.g. --set "
                              "teacher.max_steps=5.")
        if name not in by_name:
            raise ConfigError(f"--set '{item}' names no step of {path}; steps: "
                              f"{', '.join(by_name)}.")
        if key in _RESERVED:
            raise ConfigError(f"--set '{item}' cannot change a step's {key}.")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        by_name[name].options[key] = value


def _drop_unused(steps: list[Step]) -> list[Step]:
    """Remove optional steps no remaining step refers to (repeatedly: a dropped step may
    have been the only user of another optional step)."""
    while True:
        used = {dep for s in steps for dep in s.deps}
        keep = [s for s in steps if not s.optional or s.name in used]
        if len(keep) == len(steps):
            return steps
        steps = keep


def _refs(value: Any) -> list[str]:
    if isinstance(value, str):
        return REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _toposort(steps: list[Step], path: Path) -> list[Step]:
    """Order steps so that every step comes after the steps it refers to (stable)."""
    by_name = {s.name: s for s in steps}
    state: dict[str, int] = {}  # 1 = visiting, 2 = done
    order: list[Step] = []

    def visit(s: Step, stack: list[str]) -> None:
        if state.get(s.name) == 2:
            return
        if state.get(s.name) == 1:
            cycle = stack[stack.index(s.name):] + [s.name]
            raise _err(path, s.line, f"steps form a cycle: {' -> '.join(cycle)}; remove one of "
                       "these references.")
        state[s.name] = 1
        for dep in s.deps:
            visit(by_name[dep], stack + [s.name])
        state[s.name] = 2
        order.append(s)

    for s in steps:
        visit(s, [])
    return order


def resolve_options(recipe: Recipe, step: Step) -> dict[str, Any]:
    """Options with every ``${name}`` replaced by that step's output directory."""

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return REF.sub(lambda m: str(recipe.out_dir(m.group(1))), value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return {k: sub(v) for k, v in step.options.items()}


def build_config(recipe: Recipe, step: Step):
    """The step's validated pydantic config, output field set to its directory."""
    kind = STEP_KINDS[step.kind]
    options = resolve_options(recipe, step)
    options["out"] = str(recipe.out_dir(step.name))
    return kind.config_class()(**options)


def validate_step(recipe: Recipe, step: Step) -> None:
    """Check a step's options with its verb's pydantic model; errors name file, line, field."""
    from pydantic import ValidationError

    if "out" in step.options:
        raise _err(recipe.path, step.option_lines.get("out", step.line),
                   f"step '{step.name}': 'out' is set by the pipeline "
                   f"(<workdir>/{step.name}); remove it and refer to the step as ${{{step.name}}}.")
    try:
        build_config(recipe, step)
    except ConfigError as e:
        raise _err(recipe.path, step.line, f"step '{step.name}': {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        key = loc[0] if loc else ""
        line = step.option_lines.get(key, step.line)
        field_name = ".".join(loc) or "?"
        msg = first.get("msg", "invalid value").removeprefix("Value error, ").rstrip(".")
        if first.get("type") == "extra_forbidden":
            msg = f"'{key}' is not an option of the '{step.kind}' step"
        if not loc:
            raise _err(recipe.path, line, f"step '{step.name}': {msg}.") from None
        raise _err(recipe.path, line, f"step '{step.name}', field '{field_name}': {msg}.") from None


def config_hash(recipe: Recipe, step: Step, upstream: dict[str, str]) -> str:
    """A hash over the step kind, its options and the hashes of the steps it refers to.

    Referring by hash (not path) means that a changed option upstream changes every hash
    downstream, so those steps rerun.
    """
    from slmkit import __version__

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return REF.sub(lambda m: "@" + upstream[m.group(1)], value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    payload = {"kind": step.kind, "options": sub(step.options),
               "slmkit": __version__.split(".")[0] + "." + __version__.split(".")[1]}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
