import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# fastdecode.py: the roomy KV cache must hold exactly what transformers' own cache
# holds, through every way the engine touches it; the swapped head must compute the
# same product as nn.Linear.

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from fastdecode import FewRowsHead, HalfWeightLinear, RoomyLayer, SharedPrefix, new_cache, use_half_weights
from linears import half_weights_supported
from transformers_runner import cache_argument


def kv(batch: int, length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, length, 8, generator=g), torch.randn(batch, 3, length, 8, generator=g)


def same(a: DynamicLayer, b: DynamicLayer) -> None:
    assert a.get_seq_length() == b.get_seq_length()
    assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_roomy_layer_matches_dynamic_layer_over_prefill_and_many_steps():
    plain, roomy = DynamicLayer(), RoomyLayer()
    for step, length in enumerate([30] + [1] * (RoomyLayer.SPARE * 2 + 5)):  # crosses the room twice
        k, v = kv(4, length, step)
        ka, va = plain.update(k, v)
        kb, vb = roomy.update(k, v)
        assert torch.equal(ka, kb) and torch.equal(va, vb)
    same(plain, roomy)


def test_roomy_layer_writes_in_place_between_rebuilds():
    roomy = RoomyLayer()
    roomy.update(*kv(2, 10, 0))
    storage = roomy.keys.untyped_storage().data_ptr()
    for step in range(RoomyLayer.SPARE):
        roomy.update(*kv(2, 1, step + 1))
        assert roomy.keys.untyped_storage().data_ptr() == storage
    roomy.update(*kv(2, 1, 999))  # no room left: a bigger buffer
    assert roomy.keys.untyped_storage().data_ptr() != storage
    assert roomy.get_seq_length() == 10 + RoomyLayer.SPARE + 1


def test_roomy_layer_follows_rows_cut_columns_trimmed_and_rows_joined():
    plain, roomy = DynamicLayer(), RoomyLayer()
    for layer in (plain, roomy):
        layer.update(*kv(4, 12, 0))
        layer.update(*kv(4, 1, 1))
    index = torch.tensor([0, 2, 3])
    for layer in (plain, roomy):  # a sequence leaves: batch_select_indices
        layer.batch_select_indices(index)
        layer.update(*kv(3, 1, 2))
    same(plain, roomy)
    for layer in (plain, roomy):  # padding columns go, a new row joins (as Engine._join does)
        layer.keys, layer.values = layer.keys[:, :, 2:], layer.values[:, :, 2:]
        extra_k, extra_v = kv(1, layer.keys.shape[-2], 3)
        layer.keys = torch.cat([layer.keys, extra_k])
        layer.values = torch.cat([layer.values, extra_v])
        layer.update(*kv(4, 1, 4))
    same(plain, roomy)


def test_new_cache_uses_roomy_layers_for_a_llama_config():
    from transformers import LlamaConfig

    config = LlamaConfig(num_hidden_layers=3, hidden_size=32, intermediate_size=64,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100)
    cache = new_cache(config)
    assert len(cache.layers) == 3 and all(type(layer) is RoomyLayer for layer in cache.layers)


@pytest.mark.parametrize("rows", [1, 2, 3, 8, 64, 65, 200])
@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_head_computes_the_linear_product(rows, bias):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(48, 500, bias=bias)
    head = FewRowsHead(linear)
    x = torch.randn(rows, 1, 48)  # (batch, positions, hidden) as the model calls it
    with torch.inference_mode():
        want, got = linear(x), head(x)
    assert got.shape == want.shape == (rows, 1, 500)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    if rows == 1:
        assert torch.equal(got, want)  # a single row takes the very same path


needs_fbgemm = pytest.mark.skipif(not half_weights_supported(), reason="fbgemm float16 needs AVX2 and F16C")


@needs_fbgemm
@pytest.mark.parametrize("rows", [1, 8, 63, 64, 300])
def test_half_weight_linear_is_the_product_with_float16_rounded_weights(rows):
    torch.manual_seed(rows)
    linear = torch.nn.Linear(64, 96)
    half = HalfWeightLinear(linear)
    x = torch.randn(rows, 1, 64)
    with torch.inference_mode():
        got = half(x)
        want = torch.nn.functional.linear(x, linear.weight.half().float(), linear.bias)
    assert got.shape == (rows, 1, 96) and got.dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


@needs_fbgemm
def test_half_weight_rows_do_not_depend_on_the_other_rows():
    # Batch fidelity rests on this: one row's output is the same alone or among 8, up
    # to the summation order of the kernel chosen for that row count (~1e-6, as
    # with float32's own Linear).
    torch.manual_seed(0)
    half = HalfWeightLinear(torch.nn.Linear(576, 1536, bias=False))
    x = torch.randn(8, 576)
    with torch.inference_mode():
        together = half(x)
        alone = torch.cat([half(x[i:i + 1]) for i in range(8)])
        many = half(torch.cat([x, torch.randn(100, 576)]))[:8]  # prefill-sized: the float32 path
    assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    assert torch.allclose(many, alone, atol=1e-5, rtol=0)


@needs_fbgemm
def test_use_half_weights_swaps_every_linear_and_keeps_embeddings():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.inference_mode():
        before = model(input_ids=ids).logits
        use_half_weights(model)
        after = model(input_ids=ids).logits
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.get_output_embeddings(), HalfWeightLinear)
    assert type(model.get_input_embeddings()) is torch.nn.Embedding
    assert torch.allclose(before, after, atol=1e-2)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100)
    return LlamaForCausalLM(config).eval()


def test_the_cache_is_passed_by_the_name_the_installed_transformers_reads():
    # transformers 5.2x renamed past_key_values to cache; 5.17 (the GPU machines') ignores
    # an unknown `cache` and leaves it empty.
    model = tiny_llama()
    with torch.inference_mode():
        cache = new_cache(model.config)
        model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True, **{cache_argument(model): cache})
    assert cache.get_seq_length() == 3


def test_a_prefill_seeded_with_the_shared_prefix_matches_a_full_prefill():
    # The engine's layout: [cached prefix][left padding][rest of the prompt] per row.
    model = tiny_llama()
    prefix, rests = [5, 6, 7, 8, 9], [[11, 12, 13], [21, 22, 23, 24, 25, 26]]
    with torch.inference_mode():
        cache = new_cache(model.config)
        model(input_ids=torch.tensor([prefix]), use_cache=True, **{cache_argument(model): cache})
        shared = SharedPrefix(prefix, cache)
        assert shared.covers(prefix + [1]) and not shared.covers(prefix) and not shared.covers([4] + prefix)

        seeded = new_cache(model.config)
        shared.seed(seeded, len(rests))
        width = max(map(len, rests))
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rests])
        mask = torch.tensor([[1] * len(prefix) + [0] * (width - len(r)) + [1] * len(r) for r in rests])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, len(prefix):]
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_argument(model): seeded}).logits[:, -1]
        for row, rest in enumerate(rests):
            alone = model(input_ids=torch.tensor([prefix + rest])).logits[0, -1]
            assert torch.allclose(batched[row], alone, atol=1e-5)
