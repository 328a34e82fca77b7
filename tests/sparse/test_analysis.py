"""Analysis of sparse networks on hand-built masks whose answers are known."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_ggr.sparse.analysis import analyze_layer, analyze_masks, sparse_flops


def _mask(shape, active_positions):
    mask = torch.zeros(shape, dtype=torch.bool)
    for position in active_positions:
        mask[position] = True
    return mask


def test_linear_layer_counts():
    # rows 0 and 2 empty; column 3 and 4 empty
    mask = _mask((4, 5), [(1, 0), (1, 1), (3, 2), (3, 0)])
    layer = analyze_layer("fc.weight", mask)
    assert (layer.active, layer.total) == (4, 20)
    assert layer.density == pytest.approx(0.2)
    assert (layer.neurons, layer.empty_neurons) == (4, 2)
    assert (layer.inputs, layer.empty_inputs) == (5, 2)
    assert layer.empty_neurons_pct == pytest.approx(50.0)
    assert layer.empty_inputs_pct == pytest.approx(40.0)
    assert layer.kernel == 1
    assert layer.params_star == (4 - 2) * (5 - 2)


def test_conv_layer_counts_by_channel():
    # (out=3, in=2, 2, 2): neuron 1 empty, input channel 0 empty
    mask = _mask((3, 2, 2, 2), [(0, 1, 0, 0), (2, 1, 1, 1), (2, 1, 0, 1)])
    layer = analyze_layer("conv.weight", mask)
    assert (layer.empty_neurons, layer.neurons) == (1, 3)
    assert (layer.empty_inputs, layer.inputs) == (1, 2)
    assert layer.kernel == 4
    assert layer.params_star == 2 * 1 * 4


def test_overall_pools_neurons_over_layers():
    small = _mask((2, 3), [(0, 0)])  # 1 of 2 neurons empty, 2 of 3 inputs empty
    large = torch.ones(8, 3, dtype=torch.bool)  # no empty neuron or input
    analysis = analyze_masks({"a": small, "b": large})
    # pooled: (1 + 0) / (2 + 8), not the mean of 50% and 0%
    assert analysis.empty_neurons == 1
    assert analysis.empty_neurons_pct == pytest.approx(10.0)
    assert analysis.empty_inputs_pct == pytest.approx(100.0 * 2 / 6)
    assert analysis.params_star == 1 * 1 + 8 * 3
    assert analysis.active == 25
    assert analysis.density == pytest.approx(25 / 30)


def test_grouped_conv_needs_the_module():
    conv = nn.Conv2d(4, 4, 3, groups=2, bias=False)  # weight (4, 2, 3, 3)
    mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    mask[0, 0, 1, 1] = True  # group 0: neuron 0 uses input channel 0
    mask[3, 1, 0, 0] = True  # group 1: neuron 3 uses input channel 2 + 1 = 3
    model = nn.Sequential(conv)
    analysis = analyze_masks({"0.weight": mask}, module=model)
    layer = analysis.layers["0.weight"]
    assert layer.groups == 2
    assert (layer.neurons, layer.empty_neurons) == (4, 2)
    assert (layer.inputs, layer.empty_inputs) == (4, 2)
    # each group keeps one neuron and one input: 2 groups * 1 * 1 * 9
    assert layer.params_star == 18


def test_depthwise_conv():
    conv = nn.Conv2d(3, 3, 3, groups=3, bias=False)  # weight (3, 1, 3, 3)
    mask = torch.ones(3, 1, 3, 3, dtype=torch.bool)
    mask[1] = False
    with_module = analyze_masks({"0.weight": mask}, module=nn.Sequential(conv)).layers["0.weight"]
    assert (with_module.empty_neurons, with_module.neurons) == (1, 3)
    assert (with_module.empty_inputs, with_module.inputs) == (1, 3)
    assert with_module.params_star == 2 * 9
    plain = analyze_masks({"0.weight": mask}).layers["0.weight"]
    assert plain.params_star == 2 * 9
    assert (plain.empty_inputs, plain.inputs) == (0, 1)


def test_transposed_conv_swaps_channel_dims():
    conv = nn.ConvTranspose2d(2, 3, 2, bias=False)  # weight (in=2, out=3, 2, 2)
    mask = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    mask[1, 0, 0, 0] = True  # input channel 1 -> output channel 0
    mask[1, 2, 1, 1] = True  # input channel 1 -> output channel 2
    layer = analyze_masks({"0.weight": mask}, module=nn.Sequential(conv)).layers["0.weight"]
    assert layer.transposed
    assert (layer.neurons, layer.empty_neurons) == (3, 1)
    assert (layer.inputs, layer.empty_inputs) == (2, 1)
    assert layer.params_star == 2 * 1 * 4


def test_vector_mask_reads_as_column():
    layer = analyze_layer("bias", torch.tensor([True, False, True]))
    assert (layer.neurons, layer.empty_neurons, layer.inputs, layer.empty_inputs) == (3, 1, 1, 0)
    assert layer.params_star == 2


def test_fully_empty_layer():
    layer = analyze_layer("w", torch.zeros(3, 4, dtype=torch.bool))
    assert layer.empty_neurons_pct == 100.0
    assert layer.empty_inputs_pct == 100.0
    assert layer.params_star == 0


def test_params_give_mean_magnitude_and_shape_check():
    mask = torch.tensor([[True, False], [False, True]])
    weight = torch.tensor([[2.0, 0.0], [0.0, -4.0]])
    analysis = analyze_masks({"w": mask}, {"w": weight})
    assert analysis.layers["w"].mean_abs_active == pytest.approx(3.0)
    assert analyze_masks({"w": mask}).layers["w"].mean_abs_active is None
    with pytest.raises(ValueError, match="has shape"):
        analyze_masks({"w": mask}, {"w": torch.zeros(3)})


def test_scalar_mask_and_bad_groups_raise():
    with pytest.raises(ValueError, match="at least one dimension"):
        analyze_layer("w", torch.tensor(True))
    with pytest.raises(ValueError, match="cannot be split"):
        analyze_layer("w", torch.ones(3, 2, dtype=torch.bool), groups=2)


def test_to_dict_is_json_ready():
    mask = _mask((4, 5), [(1, 0), (3, 2)])
    payload = analyze_masks({"fc.weight": mask}, {"fc.weight": torch.randn(4, 5)}).to_dict()
    decoded = json.loads(json.dumps(payload))
    assert decoded["overall"]["params_star"] == 4
    assert decoded["overall"]["empty_neurons_pct"] == pytest.approx(50.0)
    assert decoded["layers"]["fc.weight"]["shape"] == [4, 5]
    assert set(decoded["layers"]["fc.weight"]) >= {
        "active", "total", "density", "empty_neurons", "empty_neurons_pct", "empty_inputs",
        "empty_inputs_pct", "params_star",
    }


@settings(max_examples=60, deadline=None)
@given(
    out=st.integers(1, 6),
    inputs=st.integers(1, 6),
    kernel=st.sampled_from([(), (1,), (2, 2), (3, 1)]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_counts_match_brute_force(out, inputs, kernel, density, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand((out, inputs, *kernel), generator=generator) < density
    layer = analyze_layer("w", mask)
    empty_out = sum(1 for o in range(out) if not mask[o].any())
    empty_in = sum(1 for i in range(inputs) if not mask[:, i].any())
    k = 1
    for d in kernel:
        k *= d
    assert layer.empty_neurons == empty_out
    assert layer.empty_inputs == empty_in
    assert layer.params_star == (out - empty_out) * (inputs - empty_in) * k
    assert layer.active <= layer.params_star <= layer.total


@settings(max_examples=30, deadline=None)
@given(groups=st.sampled_from([1, 2, 3]), per_group=st.integers(1, 3),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_grouped_params_star_bounds(groups, per_group, density, seed):
    channels = groups * per_group
    conv = nn.Conv2d(channels, channels, 2, groups=groups)
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(conv.weight.shape, generator=generator) < density
    layer = analyze_masks({"0.weight": mask}, module=nn.Sequential(conv)).layers["0.weight"]
    assert layer.active <= layer.params_star <= layer.total
    # a neuron of a group only sees that group's inputs: brute force per channel
    empty_in = sum(
        1 for c in range(channels)
        if not mask[(c // per_group) * per_group:(c // per_group + 1) * per_group,
                    c % per_group].any()
    )
    assert layer.empty_inputs == empty_in


# -------------------------------------------------------------------------------- FLOPs


def test_flops_linear_and_conv():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 5))
    conv_mask = torch.zeros(4, 2, 3, 3, dtype=torch.bool)
    conv_mask.view(-1)[:10] = True
    linear_mask = torch.zeros(5, 144, dtype=torch.bool)
    linear_mask.view(-1)[:7] = True
    sparse, dense = sparse_flops(model, {"0.weight": conv_mask, "3.weight": linear_mask},
                                 torch.randn(1, 2, 6, 6))
    assert sparse == 10 * 36 + 7
    assert dense == 72 * 36 + 5 * 144


def test_flops_unmasked_layers_count_dense_and_batch_scales():
    model = nn.Sequential(nn.Linear(10, 5), nn.Linear(5, 3))
    mask = torch.zeros(5, 10, dtype=torch.bool)
    mask[0, :4] = True
    sparse, dense = sparse_flops(model, {"0.weight": mask}, torch.randn(2, 10))
    assert sparse == 2 * (4 + 15)
    assert dense == 2 * (50 + 15)


def test_flops_linear_extra_dims_stride_and_depthwise():
    model = nn.Linear(10, 5)
    mask = torch.ones(5, 10, dtype=torch.bool)
    mask[:, 0] = False
    assert sparse_flops(model, {"weight": mask}, torch.randn(1, 3, 10)) == (3 * 45, 3 * 50)
    strided = nn.Conv2d(1, 2, 2, stride=2)  # 8x8 -> 4x4
    assert sparse_flops(strided, {}, torch.randn(1, 1, 8, 8)) == (8 * 16, 8 * 16)
    depthwise = nn.Conv2d(3, 3, 3, padding=1, groups=3)  # weight (3, 1, 3, 3)
    mask = torch.ones(3, 1, 3, 3, dtype=torch.bool)
    mask[0] = False
    assert sparse_flops(depthwise, {"weight": mask}, torch.randn(1, 3, 5, 5)) == (18 * 25,
                                                                                 27 * 25)


def test_flops_transposed_conv_counts_input_positions():
    model = nn.ConvTranspose2d(2, 3, 2, stride=2)  # weight (2, 3, 2, 2); 4x4 -> 8x8
    mask = torch.zeros(2, 3, 2, 2, dtype=torch.bool)
    mask[0, 0] = True
    assert sparse_flops(model, {"weight": mask}, torch.randn(1, 2, 4, 4)) == (4 * 16, 24 * 16)


def test_flops_leave_training_state_and_statistics_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2), nn.Dropout())
    model.train()
    model[2].eval()
    before = model[1].running_mean.clone()
    sparse_flops(model, {}, torch.randn(1, 1, 3, 3) + 5.0)
    assert model.training and model[1].training and not model[2].training
    assert torch.equal(model[1].running_mean, before)
    assert not model[0]._forward_hooks


def test_conv1d_reads_neurons_from_its_columns():
    """transformers' Conv1D stores its weight (in, out): with the module, neurons are columns
    and inputs rows (without it, the mask would be read the other way round)."""
    from tests.helpers.models import Conv1D

    model = nn.Sequential(Conv1D(3, 2))  # weight (in=2, out=3)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    mask[1, 0] = mask[1, 2] = True  # input 1 -> outputs 0 and 2
    layer = analyze_masks({"0.weight": mask}, module=model).layers["0.weight"]
    assert layer.transposed
    assert (layer.neurons, layer.empty_neurons) == (3, 1)
    assert (layer.inputs, layer.empty_inputs) == (2, 1)
    assert layer.params_star == 2 * 1
    plain = analyze_masks({"0.weight": mask}).layers["0.weight"]
    assert (plain.neurons, plain.inputs) == (2, 3)


def test_flops_count_conv1d_like_a_linear_layer():
    from tests.helpers.models import Conv1D

    model = nn.Sequential(Conv1D(5, 10), Conv1D(2, 5))  # weights (10, 5) and (5, 2)
    mask = torch.zeros(10, 5, dtype=torch.bool)
    mask[:4, 0] = True
    x = torch.randn(1, 3, 10)  # 3 positions
    assert sparse_flops(model, {"0.weight": mask}, x) == (3 * (4 + 10), 3 * (50 + 10))
