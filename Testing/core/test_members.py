"""Ensemble members from several trainings and mirrored inputs (model.json "members")."""

from __future__ import annotations

import pytest
import torch

from DiffSegCore.errors import ModelError
from DiffSegCore.inference.ensemble import member_probabilities
from DiffSegCore.inference.plan import make_plan
from DiffSegCore.inference.predictor import (
    bundle_members,
    conditioning,
    member_views,
    sample_members,
    sampling_schedule,
)
from DiffSegCore.models.bundle import load_bundle, network_config, save_bundle
from DiffSegCore.networks.unet import build_network
from DiffSegCore.settings import resolve
from Testing.conftest import tiny_meta

MEMBERS = {"networks": 2, "mirror_axes": [2]}


def one_member(network, cond, schedule, seed, k, start=None):
    """Member k sampled alone, in float32: probabilities (K, *S)."""
    return sample_members(
        network, cond, schedule, prediction="x0", sampler="ddim", eta=0.0, seed=seed, members=[k], precision="float32",
        start=start,
    )[0]  # fmt: skip


def _two_network_bundle(folder, members=MEMBERS):
    """A real bundle with two differently initialised diffusion networks; returns (path, their state dicts)."""
    meta = tiny_meta(members=members, preseg_network=None)
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(build_network(network_config(meta, "network")).state_dict())
    return save_bundle(folder, meta, states[0], None, states[1:]), states


def test_members_cycle_through_networks_then_mirrorings():
    views = member_views({"members": MEMBERS}, range(6))
    assert views == {(0, ()): [0, 4], (1, ()): [1, 5], (0, (2,)): [2], (1, (2,)): [3]}
    # Two mirrored axes: none, each axis, then both.
    both = member_views({"members": {"networks": 1, "mirror_axes": [2, 0]}}, range(5))
    assert both == {(0, ()): [0, 4], (0, (0,)): [1], (0, (2,)): [2], (0, (0, 2)): [3]}
    assert member_views({}, range(3)) == {(0, ()): [0, 1, 2]}


def test_bundle_holds_and_loads_every_network(tmp_path):
    path, states = _two_network_bundle(tmp_path / "two")
    assert (path / "diffusion.1.safetensors").is_file()
    bundle = load_bundle(path)
    assert len(bundle.networks) == 2
    for network, state in zip(bundle.networks, states):
        assert all(torch.equal(network.state_dict()[k], v) for k, v in state.items())
    assert not torch.equal(
        bundle.networks[0].state_dict()["stem.weight"], bundle.networks[1].state_dict()["stem.weight"]
    )


def test_declared_networks_must_match_the_weights_given(tmp_path):
    meta = tiny_meta(members={"networks": 3}, preseg_network=None)
    state = build_network(network_config(meta, "network")).state_dict()
    with pytest.raises(ModelError, match="declares 3 networks but 2 are given"):
        save_bundle(tmp_path / "bad", meta, state, None, [state])
    assert not (tmp_path / "bad").exists()


def test_each_member_comes_from_its_network_and_mirroring(tmp_path):
    bundle = load_bundle(_two_network_bundle(tmp_path / "two")[0])
    settings = resolve(bundle.meta, {"ensemble": 4, "steps": 2, "precision": "float32"})
    image = torch.randn(1, 16, 24, 16, generator=torch.Generator().manual_seed(3))
    probs = member_probabilities(bundle, image, settings)
    assert probs.shape == (4, 3, 16, 24, 16)
    schedule = sampling_schedule(bundle.meta["diffusion"], 2)

    def alone(network, cond, k):
        return one_member(network, cond, schedule, settings.seed, k)

    net0, net1 = bundle.networks
    torch.testing.assert_close(probs[0], alone(net0, image, 0))
    torch.testing.assert_close(probs[1], alone(net1, image, 1))
    torch.testing.assert_close(probs[2], alone(net0, image.flip(3), 2).flip(3))  # mirrored in x and back
    torch.testing.assert_close(probs[3], alone(net1, image.flip(3), 3).flip(3))
    # Batching and order do not change a member: members 2-3 alone equal members 2-3 of the four.
    plan = make_plan(bundle, tuple(image.shape[1:]), settings)
    torch.testing.assert_close(bundle_members(bundle, image, settings, plan, 2, 2), probs[2:])


def test_single_network_bundle_samples_as_before(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    settings = resolve(bundle.meta, {"ensemble": 3, "steps": 2, "precision": "float32"})
    image = torch.randn(1, 16, 24, 16, generator=torch.Generator().manual_seed(4))
    schedule = sampling_schedule(bundle.meta["diffusion"], 2)
    direct = sample_members(
        bundle.network,
        image,
        schedule,
        prediction="x0",
        sampler="ddim",
        eta=0.0,
        seed=settings.seed,
        members=range(3),
        precision="float32",
    )
    torch.testing.assert_close(member_probabilities(bundle, image, settings), direct)


def test_mirrored_members_keep_coordinate_channels_unmirrored(tmp_path):
    meta_members = {"networks": 1, "mirror_axes": [2]}
    meta = tiny_meta(members=meta_members, preseg_network=None)
    meta["network"] = {**meta["network"], "coords": True}
    torch.manual_seed(0)
    path = save_bundle(tmp_path / "coords", meta, build_network(network_config(meta, "network")).state_dict())
    bundle = load_bundle(path)
    settings = resolve(bundle.meta, {"ensemble": 2, "steps": 1, "precision": "float32"})
    image = torch.randn(1, 16, 24, 16, generator=torch.Generator().manual_seed(5))
    cond = conditioning(bundle.network, image)
    probs = member_probabilities(bundle, image, settings)
    schedule = sampling_schedule(bundle.meta["diffusion"], 1)
    mirrored = torch.cat([image.flip(3), cond[1:]])  # the image mirrored, the global coordinates not
    expected = one_member(bundle.network, mirrored, schedule, settings.seed, 1).flip(3)
    torch.testing.assert_close(probs[1], expected)


def test_a_networks_mirrored_and_plain_members_share_a_batch_from_their_own_starts(tmp_path):
    bundle = load_bundle(_two_network_bundle(tmp_path / "two")[0])
    settings = resolve(bundle.meta, {"ensemble": 3, "steps": 2, "precision": "float32", "preseg_step": 1})
    image = torch.randn(1, 16, 24, 16, generator=torch.Generator().manual_seed(6))
    preseg = torch.randint(0, 3, (16, 24, 16), generator=torch.Generator().manual_seed(7))
    plan = make_plan(bundle, tuple(image.shape[1:]), settings)
    probs = bundle_members(bundle, image, settings, plan, 0, 3, preseg)  # members 0 and 2: network 0, one batch
    schedule = sampling_schedule(bundle.meta["diffusion"], 2, 1)
    mirrored = one_member(bundle.networks[0], image.flip(3), schedule, settings.seed, 2, preseg.flip(2)).flip(3)
    torch.testing.assert_close(probs[2], mirrored)  # its input and start mirrored, its prediction mirrored back
    plain = one_member(bundle.networks[0], image, schedule, settings.seed, 0, preseg)
    torch.testing.assert_close(probs[0], plain)
