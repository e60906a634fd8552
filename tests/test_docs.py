"""docs/api.md documents exactly the public API, as the code has it.

* every name in `llr_optax.__all__` has exactly one entry (a heading "### `name`"), and there is
  no entry for anything else; `__all__` itself lists every public name of the package;
* a function's or class's entry starts with a ```python block holding its signature, which
  must match `inspect.signature`: parameter names, kinds (positional, `*`, keyword-only),
  defaults and annotations, and the return annotation;
* a constant's entry holds a ```python block `NAME = <literal>` equal to the constant (same
  repr, so 1 vs 1.0 or a reordered dict counts as a difference);
* every `>>>` example on the page runs and prints what the page says (doctest, one shared
  namespace, in page order).

The checker returns a list of problems; the last tests feed it altered pages and an altered
module to show that it reports drift instead of passing everything.
"""

from __future__ import annotations

import ast
import doctest
import inspect
import itertools
import pathlib
import re
import types
import typing

import pytest

import llr_optax

API_MD = pathlib.Path(__file__).resolve().parents[1] / "docs" / "api.md"

_ENTRY = re.compile(r"^### `([A-Za-z_][A-Za-z0-9_]*)`[ \t]*$", re.M)
_HEADING = re.compile(r"^#{1,3} ", re.M)
_BLOCK = re.compile(r"```python\n(.*?)```", re.S)
_KINDS = inspect.Parameter


def _entries(text: str) -> dict[str, list[str]]:
  """{name: [body of each "### `name`" entry]}; a body runs to the next heading (# to ###)."""
  starts = [m.start() for m in _HEADING.finditer(text)] + [len(text)]
  out: dict[str, list[str]] = {}
  for m in _ENTRY.finditer(text):
    end = next(s for s in starts if s > m.start())
    out.setdefault(m.group(1), []).append(text[m.end():end])
  return out


def _definition_block(body: str) -> str | None:
  """The first ```python block of an entry that is not a doctest (signature or value)."""
  for block in _BLOCK.findall(body):
    if not block.lstrip().startswith(">>>"):
      return block.strip()
  return None


def _normalise(source: str) -> str:
  return ast.unparse(ast.parse(source, mode="eval").body)


def _annotation(a) -> str | None:
  """An annotation as source text, whether a string (postponed), a ForwardRef or an object."""
  if a is inspect.Signature.empty:
    return None
  if isinstance(a, typing.ForwardRef):
    a = a.__forward_arg__
  if not isinstance(a, str):
    a = inspect.formatannotation(a)
  return _normalise(a)


def _code_params(obj) -> tuple[list[tuple], str | None]:
  sig = inspect.signature(obj)
  params = [(p.name, p.kind, _annotation(p.annotation),
             None if p.default is _KINDS.empty else repr(p.default))
            for p in sig.parameters.values()]
  return params, _annotation(sig.return_annotation)


def _doc_params(name: str, block: str) -> tuple[list[tuple], str | None]:
  """Parses "name(params) -> returns" as the header of a def; raises ValueError if it is not."""
  if not re.match(rf"{re.escape(name)}\s*\(", block):
    raise ValueError(f"the signature block does not start with {name}(: {block[:60]!r}")
  try:
    fn = ast.parse(f"def {block}:\n  pass").body[0]
  except SyntaxError as e:
    raise ValueError(f"the signature block is not a valid signature ({e.msg})") from e
  a = fn.args

  def ann(node):
    return None if node is None else ast.unparse(node)

  def default(node):
    if node is None:
      return None
    try:
      return repr(ast.literal_eval(node))
    except ValueError as e:
      raise ValueError(f"default {ast.unparse(node)!r} is not a literal") from e

  positional = a.posonlyargs + a.args
  defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
  params = []
  for i, (arg, d) in enumerate(zip(positional, defaults)):
    kind = _KINDS.POSITIONAL_ONLY if i < len(a.posonlyargs) else _KINDS.POSITIONAL_OR_KEYWORD
    params.append((arg.arg, kind, ann(arg.annotation), default(d)))
  if a.vararg:
    params.append((a.vararg.arg, _KINDS.VAR_POSITIONAL, ann(a.vararg.annotation), None))
  for arg, d in zip(a.kwonlyargs, a.kw_defaults):
    params.append((arg.arg, _KINDS.KEYWORD_ONLY, ann(arg.annotation), default(d)))
  if a.kwarg:
    params.append((a.kwarg.arg, _KINDS.VAR_KEYWORD, ann(a.kwarg.annotation), None))
  return params, ann(fn.returns)


def _fmt(params) -> str:
  return ", ".join(f"{n} [{k.name.lower()}]" + (f": {a}" if a else "") + (f" = {d}" if d else "")
                   for n, k, a, d in params)


def _check_signature(name: str, obj, block: str | None) -> list[str]:
  if block is None:
    return [f"{name}: no ```python signature block in its entry"]
  try:
    doc, doc_ret = _doc_params(name, block)
  except ValueError as e:
    return [f"{name}: {e}"]
  code, code_ret = _code_params(obj)
  problems = []
  if doc != code:
    rows = [f"\n  docs: {_fmt([d]) if d else '(none)'}\n  code: {_fmt([c]) if c else '(none)'}"
            for d, c in itertools.zip_longest(doc, code) if d != c]
    problems.append(f"{name}: documented parameters differ from the code" + "".join(rows))
  if doc_ret != code_ret:
    problems.append(f"{name}: documented return annotation {doc_ret!r}, code has {code_ret!r}")
  return problems


def _check_value(name: str, obj, block: str | None) -> list[str]:
  if block is None or not re.match(rf"{re.escape(name)}\s*=", block):
    return [f"{name}: its entry needs a ```python block `{name} = <value>`"]
  try:
    value = ast.literal_eval(block.split("=", 1)[1].strip())
  except (ValueError, SyntaxError) as e:
    return [f"{name}: the documented value is not a Python literal ({e})"]
  if repr(value) != repr(obj):
    return [f"{name}: documented value differs from the code\n  docs: {value!r}\n"
            f"  code: {obj!r}"]
  return []


def check_api_doc(text: str, module=llr_optax) -> list[str]:
  """Every problem of `text` (an api.md) as documentation of `module`'s `__all__`."""
  names = list(module.__all__)
  entries = _entries(text)
  problems = [f"{n}: in __all__ but has no '### `{n}`' entry" for n in names if n not in entries]
  problems += [f"{n}: {len(b)} entries (expected one)" for n, b in entries.items() if len(b) > 1]
  problems += [f"{n}: documented but not in __all__" for n in entries if n not in names]
  for name in names:
    if name not in entries:
      continue
    obj = getattr(module, name)
    block = _definition_block(entries[name][0])
    if inspect.isfunction(obj) or inspect.isclass(obj):
      problems += _check_signature(name, obj, block)
    else:
      problems += _check_value(name, obj, block)
  return problems


# --- the real page ------------------------------------------------------------------------------


def test_all_lists_every_public_name():
  public = {n for n, v in vars(llr_optax).items()
            if not n.startswith("_") and not isinstance(v, types.ModuleType)}
  assert len(llr_optax.__all__) == len(set(llr_optax.__all__)), "duplicates in __all__"
  assert set(llr_optax.__all__) == public, (
      f"not in __all__: {sorted(public - set(llr_optax.__all__))}; "
      f"in __all__ but missing: {sorted(set(llr_optax.__all__) - public)}")


def test_api_doc_matches_the_code():
  problems = check_api_doc(API_MD.read_text(encoding="utf-8"))
  assert not problems, "docs/api.md is out of date:\n" + "\n".join(problems)


@pytest.mark.slow
def test_api_doc_examples_run():
  text = API_MD.read_text(encoding="utf-8")
  parser = doctest.DocTestParser()
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report: list[str] = []
  globs: dict = {}
  blocks = 0
  for m in _BLOCK.finditer(text):
    if not m.group(1).lstrip().startswith(">>>"):
      continue
    line = text.count("\n", 0, m.start(1))
    test = parser.get_doctest(m.group(1), globs, f"api.md line {line + 1}", str(API_MD), line)
    runner.run(test, out=report.append, clear_globs=False)
    globs.update(test.globs)   # later blocks may use earlier names, as a reader would
    blocks += 1
  assert blocks >= 10, f"only {blocks} example blocks found"
  failed, attempted = runner.summarize(verbose=False)
  assert failed == 0, f"{failed} of {attempted} examples failed:\n" + "".join(report)


# --- the checker reports drift --------------------------------------------------------------------


def _altered(old: str, new: str) -> str:
  text = API_MD.read_text(encoding="utf-8")
  assert text.count(old) == 1, f"{old!r} must occur exactly once in docs/api.md"
  return text.replace(old, new)


@pytest.mark.parametrize("old, new, culprit", [
    ("    s_min: float = 1.0,\n", "    s_min: float = 2.0,\n", "scale_by_alpha_hill"),
    ("    min_ratio: float = 0.5,\n    max_ratio: float = 1.5,\n    interval: int = 500,\n    ramp_steps",
     "    min_ratio: float = 0.5,\n    max_ratio: float = 1.5,\n    interval: int = 50,\n    ramp_steps",
     "add_decayed_weights_by_alpha_hill"),
    ("    *,\n    mask: Any = None,\n    **alpha_decay_kwargs",
     "    mask: Any = None,\n    **alpha_decay_kwargs", "adamw_alpha_decay"),  # a kind changes
    ("esd(w: jax.Array, estimator: str = 'auto') -> jax.Array",
     "esd(w: jax.Array, solver: str = 'auto') -> jax.Array", "esd"),
    ("hill_alpha(eigenvalues: jax.Array, zero_threshold: float | None = None) -> jax.Array",
     "hill_alpha(eigenvalues: jax.Array, zero_threshold: float = 1e-05) -> jax.Array",
     "hill_alpha"),
    ("RelativeScheduleState(count: jax.Array, scales: _per_leaf.PerLeaf)",
     "RelativeScheduleState(scales: _per_leaf.PerLeaf)", "RelativeScheduleState"),
    ("DENSE_FINAL_FRACTION = 0.06", "DENSE_FINAL_FRACTION = 0.05", "DENSE_FINAL_FRACTION"),
    ("'ramp_steps': 50,", "'ramp_steps': 50.0,", "ALPHA_HILL_PAPER"),
    ("### `warmup_steps_for`", "### warmup_steps_for", "warmup_steps_for"),
    ("### `MOE_FINAL_FRACTION`", "### `MOE_FINAL_FRACTION`\n\n### `label_path`", "label_path"),
])
def test_checker_reports_an_altered_page(old, new, culprit):
  problems = check_api_doc(_altered(old, new))
  assert any(p.startswith(f"{culprit}:") for p in problems), problems


def test_checker_reports_a_changed_signature_in_the_code():
  module = types.ModuleType("llr_optax_changed")
  for name in llr_optax.__all__:
    setattr(module, name, getattr(llr_optax, name))
  module.__all__ = list(llr_optax.__all__)

  def warmup_steps_for(total_steps: int, fraction: float = 0.02) -> int:
    return 0

  module.warmup_steps_for = warmup_steps_for
  problems = check_api_doc(API_MD.read_text(encoding="utf-8"), module)
  assert [p.split(":")[0] for p in problems] == ["warmup_steps_for"], problems

  module.__all__ = module.__all__ + ["new_public_function"]
  module.new_public_function = lambda: None
  assert any(p.startswith("new_public_function:") for p in check_api_doc(
      API_MD.read_text(encoding="utf-8"), module))
