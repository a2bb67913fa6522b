"""What a comparison runs: the rows (base model + one per method setting), their settings and the evaluation.

Settings come from recipes.yaml (a profile for the builtin model, one for real models) and the registered
methods (each declares its rows and their settings per profile), deep-merged with the user's --config file;
every row's sections are validated here, before anything trains.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import DataConfig, TrainConfig, build, load_config_file
from ..errors import SdtuneError

RECIPES = Path(__file__).with_name("recipes.yaml")
# The profile's shared data settings that also suit one `sdtune train` run (class images for prior preservation
# and captions); the others describe the comparison.
DATA_DEFAULT_KEYS = ("use_captions", "num_class_images", "class_image_steps")
BASE_ROW = "base"
DEFAULT_ROWS = "default"  # --methods value: the rows methods declare in_default (what `sdtune compare` runs)
EVAL_KEYS = ("sample_steps", "guidance", "images_per_prompt", "curve_images_per_prompt", "curve_points",
             "prompts", "class_prompts")


@dataclass(frozen=True)
class EvalSettings:
    """How every row is evaluated: prompt templates ({token}, {class_word}) and sampling settings;
    `curve_prompts` are the indices of the prompts also sampled before the final step (empty: all)."""

    prompts: tuple[str, ...]
    class_prompts: tuple[str, ...]
    sample_steps: int = 20
    guidance: float = 7.5
    images_per_prompt: int = 4
    curve_images_per_prompt: int = 2
    curve_points: int = 3
    curve_prompts: tuple[int, ...] = ()


@dataclass
class Row:
    """One line of the comparison: a method with its settings, or the untouched base model (method None)."""

    name: str
    method: str | None
    token: str
    data: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    method_cfg: dict = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return int(self.train.get("steps", 0)) if self.method else 0

    def settings(self, shared: dict) -> dict:
        """The row's settings as the report shows them: the base row holds the shared data settings, the
        others their method, token, train and method sections and any data setting of their own."""
        if self.method is None:
            return {"data": self.data}
        own = {k: v for k, v in self.data.items() if shared.get(k) != v}
        out = {"method": self.method, "token": self.token, "train": self.train, self.method: self.method_cfg}
        return {**out, "data": own} if own else out


@dataclass
class Plan:
    """Everything `sdtune compare` will do, resolved and validated."""

    profile: str
    token: str
    class_word: str
    evaluation: EvalSettings
    rows: list[Row]


def profile_for(model: str) -> str:
    """The builtin model uses the toy-world profile (on its subjects or one's own); any other the real-model one."""
    return "builtin" if model == "builtin" else "real"


def load_plan(profile: str, token: str, class_word: str, methods: str = DEFAULT_ROWS, config: str | None = None,
              default_prompts: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> Plan:
    """Resolve the profile (plus --config) into validated rows; `default_prompts` are (subject, class)
    prompt templates used when the profile names none (the toy world's evaluation prompts)."""
    recipe = merge(profile_recipe(profile), load_config_file(config) if config else {})
    evaluation = _evaluation(recipe.get("eval", {}), default_prompts)
    shared = _with_class_word(recipe.get("data", {}), class_word)
    rows = [Row(BASE_ROW, None, token, shared)]
    for name, spec in _selected(recipe.get("rows", {}), methods).items():
        rows.append(_row(name, spec, shared, token, class_word))
    return Plan(profile, token, class_word, evaluation, rows)


def profile_recipe(profile: str) -> dict:
    """A profile of recipes.yaml with its rows: each registered method's compare rows, in registry order."""
    from .. import methods

    recipe = yaml.safe_load(RECIPES.read_text(encoding="utf-8"))[profile]
    recipe["rows"] = {row.name: {"method": cls.name, **copy.deepcopy(dict(row.recipes.get(profile, {})))}
                      for cls in methods.registry().values() for row in methods.rows_of(cls)}
    return recipe


def training_defaults(model: str, method: str, chosen: dict | None = None) -> dict:
    """`sdtune train METHOD`'s defaults on `model`, in config-file shape ({"data": ..., "train": ..., METHOD:
    ...}): on the builtin model its profile's row for the method (the recipe the comparison measured; the
    library's defaults are for real models and learn nothing on it), elsewhere nothing. `chosen`: the
    method settings the user gave, which pick among the method's rows (see Method.recipe_keys)."""
    if model != "builtin":
        return {}
    profile = profile_recipe("builtin")
    row = _recipe_row(profile.get("rows", {}), method, chosen or {})
    out = {"data": {k: v for k, v in profile.get("data", {}).items() if k in DATA_DEFAULT_KEYS},
           "train": dict(row.get("train", {})), method: dict(row.get(method, {}))}
    if "token" in row:
        out["data"]["token"] = row["token"].replace("{token}", DataConfig().token)
    return out


def _recipe_row(rows: dict, method: str, chosen: dict) -> dict:
    """The method's row whose recipe keys agree with `chosen` (unset keys at the settings' defaults), else the
    row named after the method."""
    from dataclasses import asdict

    from .. import methods

    cls = methods.get(method)
    defaults = asdict(cls.config_class())

    def picks(settings: dict) -> dict:
        return {key: settings.get(key, defaults[key]) for key in cls.recipe_keys}

    if cls.recipe_keys:
        for row in rows.values():
            if row.get("method") == method and picks(row.get(method) or {}) == picks(chosen):
                return row
    return rows.get(method) or {}


def command_defaults(model: str, method: str) -> dict:
    """Every data, train and METHOD setting `sdtune train METHOD` uses on `model` without a flag or config file:
    the config classes' field defaults under training_defaults (the UI shows and trains with these too)."""
    from dataclasses import asdict

    from .. import methods

    fields = {"data": asdict(DataConfig()), "train": asdict(TrainConfig()),
              method: asdict(methods.get(method).config_class())}
    return merge(fields, training_defaults(model, method))


def describe_defaults(defaults: dict) -> str:
    """The defaults as `--help` states them: 'steps 400, lr 0.005, ...'."""
    return ", ".join(f"{key} {value}" for section in defaults.values() for key, value in section.items())


def merge(base: dict, override: dict) -> dict:
    """Deep merge of two nested dicts (override wins), without touching either."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _evaluation(values: dict, default_prompts) -> EvalSettings:
    unknown = sorted(set(values) - set(EVAL_KEYS))
    if unknown:
        raise SdtuneError(f"Unknown setting 'eval.{unknown[0]}'; known settings are {', '.join(EVAL_KEYS)}.")
    prompts = tuple(values.get("prompts") or (default_prompts[0] if default_prompts else ()))
    class_prompts = tuple(values.get("class_prompts") or (default_prompts[1] if default_prompts else ())
                          or (without_token(p) for p in prompts))
    if not prompts or any("{token}" not in p for p in prompts):
        raise SdtuneError("eval.prompts must be a list of prompts that each contain {token}.")
    numbers = {k: values[k] for k in EVAL_KEYS[:5] if k in values}
    for key, value in numbers.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < (0 if key == "guidance" else 1):
            raise SdtuneError(f"eval.{key} is {value!r}; it must be a positive number.")
    return EvalSettings(prompts, class_prompts, **numbers)


def _with_class_word(data: dict, class_word: str) -> dict:
    """Data settings with {class_word} filled into the class prompt (the training loop takes it verbatim)."""
    out = dict(data)
    if isinstance(out.get("class_prompt"), str):
        out["class_prompt"] = out["class_prompt"].replace("{class_word}", class_word)
    return out


def without_token(template: str) -> str:
    """A prompt template with its {token} word left out (the class prompt / the text CLIP-T compares with)."""
    return " ".join(w for w in template.split() if w != "{token}")


def _selected(rows: dict, methods: str) -> dict:
    """Rows named by --methods: 'default' (the rows declared in_default), 'all', or a comma list of row names
    and/or method names."""
    from ..methods import registry, rows_of

    if methods.strip() == "all":
        return rows
    if methods.strip() == DEFAULT_ROWS:
        chosen = {row.name for cls in registry().values() for row in rows_of(cls) if row.in_default}
        return {n: s for n, s in rows.items() if n in chosen}
    picked: dict = {}
    for item in (m.strip() for m in methods.split(",") if m.strip()):
        matches = {n: s for n, s in rows.items() if n == item or (isinstance(s, dict) and s.get("method") == item)}
        if not matches:
            known = sorted(set(rows) | set(registry()))
            raise SdtuneError(f"--methods names '{item}', which is no row or method; choose from {DEFAULT_ROWS}, all, "
                              f"{', '.join(known)}.")
        picked.update(matches)
    return {n: s for n, s in rows.items() if n in picked}


def _row(name: str, spec, shared: dict, token: str, class_word: str) -> Row:
    """A validated row: its sections build into the same config objects `sdtune train` uses."""
    from .. import methods

    if not isinstance(spec, dict) or not spec.get("method"):
        raise SdtuneError(f"Row '{name}' in the compare recipe needs a `method` (one of "
                          f"{', '.join(methods.registry())}).")
    method = spec["method"]
    method_cls = methods.get(method)
    unknown = sorted(set(spec) - {"method", "token", "data", "train", method})
    if unknown:
        raise SdtuneError(f"Row '{name}' has an unknown section '{unknown[0]}'; use data, train, token or {method}.")
    row_token = str(spec.get("token", "{token}")).replace("{token}", token)
    data = merge(shared, _with_class_word(spec.get("data") or {}, class_word))
    row = Row(name, method, row_token, data, dict(spec.get("train") or {}), dict(spec.get(method) or {}))
    build(DataConfig, {**data, "token": row_token, "class_word": class_word}, f"{name}.data")
    build(TrainConfig, row.train, f"{name}.train")
    build(method_cls.config_class, row.method_cfg, f"{name}.{method}")
    return row
