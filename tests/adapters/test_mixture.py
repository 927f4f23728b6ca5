"""Mixtures (adapters/mixture.py) == PEFT's add_weighted_adapter on the same adapters, tensor for tensor, and in
generation (solo and next to their members in one batch); DARE's random masks are PEFT's own, seeded alike."""
from __future__ import annotations

import contextlib

import pytest
import torch
from peft import LoraConfig
from peft.utils import merge_utils

from adapters.mixture import MixtureError, MixtureRecipe, make_mixture
from adapters.merge_ops import random_pruning
from tests.adapters.peft_helpers import peft_lora_modules, spec_of
from tests.peft_fixtures import load_peft, save_adapter
from tests.test_lora_vs_peft import BASE, engine_with, peft_reference, run_with_adapters
from tests.test_model_vs_hf import ATOL, make_prompts

R8 = dict(r=8, init_lora_weights=False)
ADAPTERS = {
    # one rank (linear / ties / dare_* need it), different alphas, overlapping but different targets
    "qv": LoraConfig(**R8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "qo": LoraConfig(**R8, lora_alpha=4, target_modules=["q_proj", "o_proj", "up_proj"]),
    "rs": LoraConfig(**R8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "o_proj", "up_proj"]),
    # embeddings and the output head
    "eh": LoraConfig(**R8, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"]),
    "e2": LoraConfig(**R8, lora_alpha=16, target_modules=["embed_tokens", "v_proj"]),
    # another rank, for cat / svd
    "r4": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]),
}
CASES = [
    ("linear", ["qv", "qo"], [0.7, 0.5], {}),
    ("linear", ["qv", "rs", "qo"], [1.0, -0.6, 0.3], {}),
    ("ties", ["qv", "qo", "rs"], [0.6, 1.2, 0.4], dict(density=0.5, majority_sign_method="total")),
    ("ties", ["qv", "rs"], [0.6, 0.8], dict(density=0.3, majority_sign_method="frequency")),
    ("dare_linear", ["qv", "qo"], [0.8, 0.5], dict(density=0.6)),
    ("dare_ties", ["qv", "qo", "rs"], [0.9, 0.4, 0.7], dict(density=0.5, majority_sign_method="total")),
    ("dare_ties", ["rs", "qv"], [0.9, 0.4], dict(density=0.7, majority_sign_method="frequency")),
    ("magnitude_prune", ["qv", "qo"], [0.5, 0.5], dict(density=0.4)),
    ("cat", ["qv", "r4"], [0.7, 0.9], {}),
    ("svd", ["qo", "r4"], [0.8, 0.6], {}),
    ("ties_svd", ["qv", "r4"], [0.8, 0.6], dict(density=0.5)),
    ("dare_linear_svd", ["qv", "r4"], [0.8, 0.6], dict(density=0.5)),
    ("linear", ["qo"], [1.5], {}),
    ("linear", ["eh", "e2"], [0.6, 0.9], {}),
    ("dare_ties", ["eh", "e2"], [0.6, 0.9], dict(density=0.5)),
    ("cat", ["eh", "r4"], [0.6, 0.9], {}),
    ("svd", ["eh", "e2"], [0.6, 0.9], dict(svd_rank=6)),
]
SEED = 1234


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("mix")
    dirs = {name: save_adapter(base, cfg, root / name, seed=10 + i) for i, (name, cfg) in enumerate(ADAPTERS.items())}
    return base, dirs, root


@contextlib.contextmanager
def peft_masks_seeded(seed: int, drawn: list):
    """PEFT draws DARE masks from torch's global generator, after add_weighted_adapter has initialised the new
    adapter (which uses it too). Reseed the global generator with `seed` at the first mask PEFT draws, so PEFT's
    own code draws its masks from the stream ours draws from; every mask PEFT draws is recorded in `drawn`."""
    original = merge_utils.random_pruning
    started = []

    def seeded(tensor, density, rescale):
        if not started:
            torch.manual_seed(seed)
            started.append(True)
        state = torch.get_rng_state()
        drawn.append(torch.bernoulli(torch.full_like(tensor, density)))
        torch.set_rng_state(state)
        return original(tensor, density, rescale)

    merge_utils.random_pruning = seeded
    try:
        yield
    finally:
        merge_utils.random_pruning = original


def peft_mixture(base, dirs, strategy, ids, weights, params, seed=SEED):
    model = load_peft(base, {i: dirs[i] for i in ids})
    drawn = []
    with peft_masks_seeded(seed, drawn):
        model.add_weighted_adapter(ids, weights, "mix", combination_type=strategy, **params)
    return model, drawn


def ours(base, dirs, root, strategy, ids, weights, params, seed=SEED, tag=""):
    recipe = MixtureRecipe(ids, weights, strategy, seed=seed, **params)
    out = root / f"{recipe.name}{tag}"
    return recipe, make_mixture(recipe, [str(dirs[i]) for i in ids], spec_of(base), str(out))


@pytest.mark.parametrize("strategy,ids,weights,params", CASES, ids=[f"{c[0]}-{'+'.join(c[1])}" for c in CASES])
def test_mixture_tensors_equal_peft(setup, strategy, ids, weights, params):
    base, dirs, root = setup
    model, _ = peft_mixture(base, dirs, strategy, ids, weights, params)
    _, path = ours(base, dirs, root, strategy, ids, weights, params)
    from safetensors.torch import load_file
    mine = load_file(f"{path}/adapter_model.safetensors")
    checked = 0
    for module, layer in peft_lora_modules(model).items():
        if "mix" in layer.lora_A:
            parts = (("lora_A.weight", layer.lora_A["mix"].weight), ("lora_B.weight", layer.lora_B["mix"].weight))
        elif "mix" in layer.lora_embedding_A:
            parts = (("lora_embedding_A", layer.lora_embedding_A["mix"]),
                     ("lora_embedding_B", layer.lora_embedding_B["mix"]))
        else:
            assert not any(k.startswith(f"base_model.model.{module}.") for k in mine), module
            continue
        for part, param in parts:
            got = mine[f"base_model.model.{module}.{part}"]
            torch.testing.assert_close(got, param.data, atol=1e-6, rtol=1e-5, msg=lambda m: f"{module}.{part}: {m}")
        assert layer.scaling["mix"] == pytest.approx(PeftScaling.of(path, module))
        checked += 1
    assert checked == sum(1 for k in mine if k.endswith(("lora_A.weight", "lora_embedding_A"))) > 0


class PeftScaling:
    @staticmethod
    def of(path, module):
        from adapters.config import load_config
        cfg = load_config(str(path))
        r, alpha = cfg.rank_for(module), cfg.alpha_for(module)
        return alpha / r ** 0.5 if cfg.use_rslora else alpha / r


def test_dare_masks_are_peft_masks_and_matter(setup):
    """Our generator draws the masks PEFT draws from torch's global one after manual_seed(SEED), in PEFT's order;
    another seed gives another adapter (so the equality above is about the masks, not luck)."""
    base, dirs, root = setup
    ids, weights, params = ["qv", "qo"], [0.8, 0.5], dict(density=0.6)
    _, drawn = peft_mixture(base, dirs, "dare_linear", ids, weights, params)
    # per layer: q_proj has both members, v_proj / o_proj / up_proj one each; an A and a B mask per member
    assert len(drawn) == 3 * 2 * (2 + 1 + 1 + 1)
    g = torch.Generator().manual_seed(SEED)
    for mask in drawn:
        mine = random_pruning(torch.ones_like(mask), 0.6, False, g)
        assert torch.equal(mine, mask)
    from safetensors.torch import load_file
    _, p1 = ours(base, dirs, root, "dare_linear", ids, weights, params, seed=SEED, tag="-a")
    _, p2 = ours(base, dirs, root, "dare_linear", ids, weights, params, seed=SEED + 1, tag="-b")
    a, b = load_file(f"{p1}/adapter_model.safetensors"), load_file(f"{p2}/adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)


GENERATION = [c for c in CASES if c[0] in ("linear", "ties", "dare_linear", "dare_ties")][:5] + [CASES[-3]]


@pytest.mark.parametrize("strategy,ids,weights,params", GENERATION, ids=[f"{c[0]}-{'+'.join(c[1])}" for c in GENERATION])
def test_mixture_generation_equals_peft_solo_and_beside_members(setup, strategy, ids, weights, params):
    base, dirs, root = setup
    model, _ = peft_mixture(base, dirs, strategy, ids, weights, params)
    recipe, path = ours(base, dirs, root, strategy, ids, weights, params, tag="-gen")
    engine = engine_with(base, {**{i: dirs[i] for i in ids}, recipe.name: path})
    prompts = make_prompts(31, [6, 11, 4, 9])
    names = [recipe.name, ids[0], BASE, recipe.name]
    tokens, logits = run_with_adapters(engine, prompts, names, [0, 0, 1, 2])
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        ref_tokens, ref_logits = peft_reference(model, prompt, "mix" if name == recipe.name else name)
        assert tokens[i] == ref_tokens, (i, name)
        torch.testing.assert_close(logits[i], ref_logits, atol=ATOL, rtol=0)
        solo, _ = run_with_adapters(engine, [prompt], [name], [0])
        assert solo[0] == tokens[i]
    member_alone, _ = run_with_adapters(engine, prompts[:1], [ids[0]], [0])
    base_alone, _ = run_with_adapters(engine, prompts[:1], [BASE], [0])
    assert tokens[0] != base_alone[0] and tokens[0] != member_alone[0]    # the mixture changes the output


def test_recipe_name_is_deterministic_and_canonical():
    a = MixtureRecipe(["x", "y"], [1, 0.5], "linear", density=0.3, seed=5)
    b = MixtureRecipe(("x", "y"), (1.0, 0.5), "linear")           # density / seed unused by linear
    assert a.name == b.name and a.name.startswith("mixture-") and len(a.name) == len("mixture-") + 16
    assert MixtureRecipe(["y", "x"], [0.5, 1], "linear").name != a.name
    assert MixtureRecipe(["x", "y"], [1, 0.5], "ties", density=0.3).name != a.name
    assert MixtureRecipe(["x", "y"], [1, 0.5], "dare_linear", density=0.3, seed=1).name != \
        MixtureRecipe(["x", "y"], [1, 0.5], "dare_linear", density=0.3, seed=2).name


@pytest.mark.parametrize("kwargs,param", [
    (dict(ids=[], weights=[]), "merged_adapters.ids"),
    (dict(ids=["a", "b"], weights=[1.0]), "merged_adapters.weights"),
    (dict(ids=["a"], weights=[float("nan")]), "merged_adapters.weights"),
    (dict(ids=["a", "b"], weights=[1, 1], merge_strategy="average"), "merged_adapters.merge_strategy"),
    (dict(ids=["a", "b"], weights=[1, 1], merge_strategy="ties"), "merged_adapters.density"),
    (dict(ids=["a", "b"], weights=[1, 1], merge_strategy="dare_linear", density=0.0), "merged_adapters.density"),
    (dict(ids=["a", "b"], weights=[1, 1], merge_strategy="ties", density=1.5), "merged_adapters.density"),
    (dict(ids=["a", "b"], weights=[1, 1], majority_sign_method="most"), "merged_adapters.majority_sign_method"),
])
def test_bad_recipes(kwargs, param):
    with pytest.raises(MixtureError) as info:
        MixtureRecipe(**kwargs)
    assert info.value.param == param


def test_incompatible_members(setup, tmp_path):
    base, dirs, root = setup
    with pytest.raises(MixtureError, match="one rank"):
        ours(base, dirs, tmp_path, "linear", ["qv", "r4"], [1, 1], {})
    dora = save_adapter(base, LoraConfig(r=8, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                         target_modules=["q_proj"]), tmp_path / "dora", seed=3)
    with pytest.raises(MixtureError, match="DoRA"):
        make_mixture(MixtureRecipe(["qv", "d"], [1, 1]), [str(dirs["qv"]), str(dora)], spec_of(base),
                     str(tmp_path / "m"))
