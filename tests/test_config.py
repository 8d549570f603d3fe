import pytest

from distillery import recipes
from distillery.config import Recipe, apply_overrides, from_dict, load_yaml, to_dict
from distillery.errors import DistilleryError
from distillery.pipeline import validate


def base():
    return load_yaml(recipes.find("mnist1d/kd"))


def test_shipped_recipes_found_recursively_and_validate():
    found = recipes.available()
    shipped = [n for n, p in found.items() if recipes.SHIPPED in p.parents]
    assert "mnist1d/kd" in shipped
    files = [f for f in recipes.SHIPPED.rglob("*.yaml") if not f.name.endswith(".space.yaml")]  # spaces: search
    assert len(files) == len(shipped)
    from distillery import kinds

    for name in shipped:
        if name == "lm/kd" or (name.startswith("lm/reasoning/") and name != "lm/reasoning/teacher"):
            continue  # they read a model another recipe trains first (test_cli checks the message)
        kinds.validate(recipes.load(name))


def test_round_trip_and_overrides():
    r = from_dict(Recipe, base())
    assert from_dict(Recipe, to_dict(r)) == r
    raw = apply_overrides(base(), ["distill.train.epochs=3", "distill.terms.0.temperature=2", "seed=7"])
    r2 = from_dict(Recipe, raw)
    assert r2.distill.train.epochs == 3 and r2.seed == 7
    assert r2.distill.terms[0].params == {"temperature": 2}
    assert base()["distill"]["train"]["epochs"] == 50  # the loaded mapping is not mutated


@pytest.mark.parametrize("override, fragment", [
    (["distill.train.epoch=3"], "unknown key 'distill.train.epoch'. Did you mean 'epochs'"),
    (["distill.train.epochs=three"], "distill.train.epochs: expected an integer"),
    (["distill.train.optimizer=adamx"], "allowed values: 'adamw', 'adam', 'sgd'"),
    (["distill.terms.0.loss=kdd"], "unknown loss 'kdd'. Did you mean 'kd'"),
    (["distill.terms.0.temprature=2"], "unknown parameter 'temprature'. Did you mean 'temperature'"),
    (["student.model.name=mpl"], "unknown model 'mpl'. Did you mean 'mlp'"),
    (["student.model.widths=[3]"], "unknown parameter 'widths'"),
    (["distill.terms.3.weight=1"], "is not an index"),
    (["teacher"], "not of the form"),
])
def test_bad_recipes_name_the_problem(override, fragment):
    with pytest.raises(DistilleryError) as e:
        validate(from_dict(Recipe, apply_overrides(base(), override)))
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_recipe_and_bad_yaml(tmp_path):
    with pytest.raises(DistilleryError, match="Did you mean 'mnist1d/kd'"):
        recipes.find("mnist1d/kdd")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(DistilleryError, match="not valid YAML"):
        recipes.load(str(bad))
    code = tmp_path / "code.yaml"
    code.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(DistilleryError, match="not valid YAML"):
        recipes.load(str(code))
