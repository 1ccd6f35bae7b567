"""Key-step plans and call lists, checked against the lists published by the FasterDiffusion repos."""

import pytest

from keystep.runtime.plan import PlanError, StageCall, build_calls, parse_key_steps

# DiT-FasterDiffusion sample_fasterdiffusion.py, 250 IDDPM steps (the README's printed list, sentinel 250 dropped)
DIT_250 = [0] + [d + u for d in range(0, 230, 10) for u in (6, 7, 8, 9)] + list(range(230, 250))


def test_dit_default_reproduces_the_seed_250_step_list():
    assert list(parse_key_steps("default", 250, "dit").key_steps) == DIT_250


def test_unet_default_is_fasterdiffusion_50ls_cut_to_the_step_count():
    assert parse_key_steps(None, 50, "unet").key_steps == (0, 1, 2, 3, 5, 10, 15, 25, 35)
    assert parse_key_steps(None, 20, "unet").key_steps == (0, 1, 2, 3, 5, 10, 15)


def test_groups_of_the_50ls_plan():
    plan = parse_key_steps("0,1,2,3,5,10,15,25,35", 50)
    assert [len(g) for g in plan.groups] == [1, 1, 1, 2, 5, 5, 10, 10, 15]
    assert plan.groups[3] == (3, 4) and plan.groups[-1] == tuple(range(35, 50))


def test_uniform_and_all():
    assert parse_key_steps("uniform:4", 10).key_steps == (0, 4, 8)
    base = parse_key_steps("all", 7)
    assert base.baseline and base.key_steps == tuple(range(7))


@pytest.mark.parametrize(
    "spec,steps,message",
    [
        ("1,2,3", 10, "step 0 must be a key step"),
        ("0,12", 10, "out of range"),
        ("0,-1", 10, "out of range"),
        ("0,0,3", 10, "duplicates"),
        ("uniform:0", 10, "M must be"),
        ("uniform:x", 10, "integer"),
        ("zero,one", 10, "bad key-step spec"),
        ("default", 0, "at least 1"),
    ],
)
def test_bad_plans_are_named(spec, steps, message):
    with pytest.raises(PlanError, match=message):
        parse_key_steps(spec, steps)


def test_calls_batch_whole_groups_with_cfg():
    plan = parse_key_steps("0,3", 6)
    calls = build_calls(plan, images=2, cfg=True)
    assert calls == [
        StageCall("encoder", (0,), 4),
        StageCall("decoder", (0, 1, 2), 12),
        StageCall("encoder", (3,), 4),
        StageCall("decoder", (3, 4, 5), 12),
    ]


def test_max_decoder_batch_splits_groups_and_sequential_runs_one_step_per_call():
    plan = parse_key_steps("0", 5)
    split = build_calls(plan, images=1, cfg=True, max_decoder_batch=4)
    assert [c.steps for c in split if c.stage == "decoder"] == [(0, 1), (2, 3), (4,)]
    assert all(c.batch <= 4 for c in split)
    seq = build_calls(plan, images=1, cfg=False, parallel=False)
    assert [c.steps for c in seq if c.stage == "decoder"] == [(i,) for i in range(5)]
    with pytest.raises(PlanError, match="below one step"):
        build_calls(plan, images=2, cfg=True, max_decoder_batch=3)


def test_baseline_calls_are_full_model_every_step():
    calls = build_calls(parse_key_steps("all", 3), images=1, cfg=True)
    assert calls == [StageCall("full", (i,), 2) for i in range(3)]


def test_batched_decoder_calls_split_where_the_width_engine_changes():
    plan = parse_key_steps("0,4", 7)
    engines = {"encoder": ["encoder.w1"] * 4 + ["encoder.w0"] * 3,
               "decoder": ["decoder.w0", "decoder.w0", "decoder.w1", "decoder.w0", "decoder.w1", "decoder.w1",
                           "decoder.w1"]}
    calls = build_calls(plan, images=1, cfg=True, engines=engines, max_decoder_batch=4)
    assert calls == [
        StageCall("encoder", (0,), 2, "encoder.w1"),
        StageCall("decoder", (0, 1), 4, "decoder.w0"),
        StageCall("decoder", (2,), 2, "decoder.w1"),
        StageCall("decoder", (3,), 2, "decoder.w0"),
        StageCall("encoder", (4,), 2, "encoder.w0"),
        StageCall("decoder", (4, 5), 4, "decoder.w1"),  # max_decoder_batch still caps a same-engine run
        StageCall("decoder", (6,), 2, "decoder.w1"),
    ]
    assert [c.runner for c in build_calls(plan, 1, False)] == ["encoder", "decoder", "encoder", "decoder"]
