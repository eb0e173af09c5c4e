"""UNet sample-forwards per transfer for the default schedule (a regression guard for the work skipped, not timing).

The reference spends 4 T on inversion (two images, all T steps, uncond and cond at batch 1) and 6 N on denoising
(two passes of the 3-image batch per step): 808 for T=100, S=32. This pipeline inverts only the steps denoising uses
(both images and both guidance halves in one call), runs one UNet call per denoising step with only the rows it
needs, skips the output branch while it equals the structure and drops the structure after its last use.
"""

from tiny_models import seeded

from cross_image_attention.cross_image_plan import plan_denoising_steps, row_groups_per_step, structure_last_use

T, S = 100, 32
N = T - S


def count_sample_forwards(pipe, call):
    counted = []

    def hook(module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        counted.append(sample.shape[0])

    handle = pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        call()
    finally:
        handle.remove()
    return counted


def test_default_schedule_forward_count(tiny_pipe, cat_image, astronaut_image):
    calls = count_sample_forwards(
        tiny_pipe,
        lambda: tiny_pipe(
            cat_image,
            astronaut_image,
            domain_name="animal",
            height=64,
            width=64,
            generator=seeded(0),
            output_type="latent",
        ),
    )
    reference = 4 * T + 6 * N
    inversion, denoising = calls[:N], calls[N:]
    # Inversion: steps k = S-1 .. T-2 (68 calls) of [uncond, cond] x [appearance, structure].
    assert inversion == [4] * N
    # Denoising, with the defaults: OUT from i = 11 (first mixing step), its plain pass at the 57 guided steps,
    # APP at all 68 steps, STRUCT until i = 36 (its last keys/values step).
    assert len(denoising) == N
    assert sum(denoising) == 57 + 57 + 68 + 37
    assert sum(calls) == 491 <= 500 < reference == 808


def test_structure_last_use_follows_the_gates():
    plan = plan_denoising_steps(N, (10, 90), (10, 70), (20, 100), 3.5, segment=True)
    assert [i for i, step in enumerate(plan) if step.attention_levels][0] == 11  # the counter lags by one
    structure_donor = [i for i, step in enumerate(plan) if step.attention_levels and step.donor == "structure"]
    assert structure_donor == list(range(11, 37, 5))
    assert [i for i, step in enumerate(plan) if step.capture] == [20]
    assert structure_last_use(plan) == 36
    # Without mixing or AdaIN the output is the structure all the way through.
    plain = plan_denoising_steps(N, (0, 0), (0, 0), (0, 0), 3.5, segment=False)
    assert structure_last_use(plain) == N - 1
    assert all(step.guidance_scale is None for step in plain)


def test_row_groups_per_step_hold_only_the_rows_each_step_needs():
    plan = plan_denoising_steps(N, (10, 90), (10, 70), (20, 100), 3.5, segment=True)
    groups = row_groups_per_step(plan, every_branch=False)
    assert sum(len(step) for step in groups) == 57 + 57 + 68 + 37
    assert groups[0] == ("appearance", "structure")  # the output still equals the structure
    assert groups[11] == ("out", "out_plain", "appearance", "structure")
    assert groups[-1] == ("out", "out_plain", "appearance")  # the structure is no longer needed
    # With a callback (or reconstructions) every branch is computed at every step.
    every = row_groups_per_step(plan, every_branch=True)
    assert all({"out", "appearance", "structure"} <= set(step) for step in every)
    assert [("out_plain" in step) for step in every] == [step.guidance_scale is not None for step in plan]
