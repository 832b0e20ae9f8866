from sccsdxl import constants as C


def test_fixed_values_match_the_reference():
    assert C.NUM_INFERENCE_STEPS == 20
    assert C.GUIDANCE_SCALE == 8.0
    assert (C.IMAGE_HEIGHT, C.IMAGE_WIDTH) == (1024, 1024)
    assert C.LATENT_SHAPE == (1, 4, 128, 128)
    assert C.NEGATIVE_PROMPT == "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
    assert C.RESPONSE_BYTES == 3_145_728
    assert C.CLIP_BOUNDS == (31.68631873, 31.81331801)
    assert C.FID_BOUNDS == (23.01085758, 23.95007626)


def test_scheduler_gives_the_reference_timesteps_and_sigmas():
    from diffusers import EulerDiscreteScheduler

    scheduler = EulerDiscreteScheduler(**dict(C.SCHEDULER_CONFIG))
    scheduler.set_timesteps(C.NUM_INFERENCE_STEPS)
    assert scheduler.timesteps.tolist() == list(range(951, 0, -50))
    sigmas = [round(float(s), 4) for s in scheduler.sigmas]
    assert sigmas[:3] == [11.0283, 8.3907, 6.5064] and sigmas[-2:] == [0.0413, 0.0]
    assert round(float(scheduler.init_noise_sigma), 4) == 11.0736


def test_table_shows_every_fixed_setting():
    rows = dict(C.as_table())
    assert rows["denoising steps"] == "20" and rows["guidance scale"] == "8.0"
    assert C.NEGATIVE_PROMPT in rows["negative prompt"]
