"""Unit tests of timestep sampling and loss weighting (issue 11): logit-normal and shifted sigmas, the resolution shift,
min-SNR-γ weights, noise offset, and that the default still draws exactly as before. Tiny table schedules on the CPU;
the ComfyUI-backed parts use ComfyUI's own model_sampling classes where ComfyUI is importable."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from test_training_unit import FlowSchedule, eval_loss, gen, toy_problem  # noqa: E402
from lora.injection import attached  # noqa: E402
from training import loop, objectives  # noqa: E402
from training.timesteps import TimestepSampling, shifted  # noqa: E402

pytestmark = pytest.mark.fast

N = 1000  # table length of the fakes: ComfyUI's discrete and flow tables have 1000 entries


class TableSchedule:
    """Only what timestep sampling reads: a sigma table and the optional members of objectives.Schedule."""

    def __init__(self, sigmas: torch.Tensor, prediction: str | None = None, flow_shift: float | None = None,
                 shift_for=None):
        self.sigmas = sigmas.float()
        if prediction is not None:
            self.prediction = prediction
        if flow_shift is not None:
            self.flow_shift = flow_shift
        if shift_for is not None:
            self.flow_shift_for = shift_for


def flow_schedule(shift: float = 1.0, **kw) -> TableSchedule:
    """A flow model's table as ComfyUI builds it: σ = shift(t) at t = 1/N, 2/N, …, 1."""
    return TableSchedule(shifted(torch.arange(1, N + 1, dtype=torch.float64) / N, shift), "flow", shift, **kw)


def eps_schedule(prediction: str | None = "eps") -> TableSchedule:
    """An SD1.5-like ascending σ table (log-spaced 0.03 … 15)."""
    return TableSchedule(torch.logspace(math.log10(0.03), math.log10(15.0), N), prediction)


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.special.erf(x / math.sqrt(2)))


def ks_distance(samples: torch.Tensor, cdf) -> float:
    """Kolmogorov–Smirnov statistic sup |F_n − F| of ``samples`` against the distribution function ``cdf``."""
    x, _ = samples.double().sort()
    f = cdf(x)
    n = len(x)
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - f
    below = f - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def logit_normal_cdf(mean: float, std: float):
    return lambda u: normal_cdf((torch.logit(u) - mean) / std)


DRAWS = 20000
KS_LIMIT = 1.63 / math.sqrt(DRAWS)  # the 1 % critical value: a right distribution stays below it but 1 seed in 100


# -- the default, draw for draw ---------------------------------------------------------------------------------------
def test_default_draws_exactly_plain_randn_then_randint():
    sched = eps_schedule()
    ours, plain = gen(3), gen(3)
    default = TimestepSampling()
    for shape in [(2, 4, 8, 8), (3, 16, 2, 6, 6)]:
        noise = default.noise(torch.Size(shape), ours)
        sigma = default.sigmas(sched, shape[0], ours, shape)
        assert torch.equal(noise, torch.randn(shape, generator=plain))
        assert torch.equal(sigma, sched.sigmas[torch.randint(0, N, (shape[0],), generator=plain)])
    assert default.loss_weights(sched, sigma) is None
    assert torch.equal(torch.rand(5, generator=ours), torch.rand(5, generator=plain))  # in step afterwards


@pytest.mark.parametrize("weights_only", [dict(min_snr_gamma=5.0), dict(logit_mean=1.0, logit_std=2.0)])
def test_options_that_do_not_change_the_draws_keep_them(weights_only):
    """min-SNR only weighs; logit parameters without kind="logit_normal" are unused: the draws stay the default's."""
    sched = eps_schedule()
    a, b = gen(4), gen(4)
    options = TimestepSampling(**weights_only)
    shape = torch.Size((2, 4, 4, 4))
    assert torch.equal(options.noise(shape, a), TimestepSampling().noise(shape, b))
    assert torch.equal(options.sigmas(sched, 7, a), TimestepSampling().sigmas(sched, 7, b))


# -- logit-normal -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.4, 0.7), (-1.0, 1.5)])
def test_logit_normal_flow_sigmas_follow_the_logit_normal(mean, std):
    """On an unshifted flow model σ is the drawn time itself: its histogram is the logit-normal's, σ continuous."""
    sigma = TimestepSampling("logit_normal", logit_mean=mean, logit_std=std).sigmas(flow_schedule(1.0), DRAWS, gen(0))
    assert sigma.shape == (DRAWS,) and sigma.dtype == torch.float32
    assert 0 < float(sigma.min()) and float(sigma.max()) <= 1
    assert ks_distance(sigma, logit_normal_cdf(mean, std)) < KS_LIMIT
    assert float(sigma.median()) == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)
    for q in (0.1, 0.9):  # quantiles of the logit-normal: sigmoid(mean + std·Φ⁻¹(q))
        z = math.sqrt(2) * float(torch.special.erfinv(torch.tensor(2 * q - 1)))
        assert float(sigma.quantile(q)) == pytest.approx(1 / (1 + math.exp(-(mean + std * z))), abs=0.01)
    assert len(set(sigma.tolist())) > DRAWS * 0.9  # not snapped to the 1000-entry table


def test_logit_normal_on_a_shifted_flow_model_draws_in_its_own_time():
    """A flow model whose table is shifted by 3 (SD3's) gets the logit-normal time shifted by 3: unshifting the
    sigmas gives back the logit-normal."""
    sched = flow_schedule(3.0)
    sigma = TimestepSampling("logit_normal").sigmas(sched, DRAWS, gen(1))
    assert ks_distance(shifted(sigma.double(), 1 / 3), logit_normal_cdf(0.0, 1.0)) < KS_LIMIT
    assert float(sigma.median()) == pytest.approx(0.75, abs=0.01)  # shift 3 moves the middle time 0.5 to 3/4


def test_logit_normal_on_a_discrete_table_snaps_to_its_entries_with_logit_normal_bins():
    sched = eps_schedule()
    sigma = TimestepSampling("logit_normal", logit_mean=0.5, logit_std=1.0).sigmas(sched, DRAWS, gen(2))
    index = torch.searchsorted(sched.sigmas, sigma)
    assert torch.equal(sched.sigmas[index], sigma)  # every σ is a table entry
    # entry i holds the times in [i/N, (i+1)/N): the index histogram is the logit-normal's, up to one bin
    assert ks_distance((index.double() + 0.5) / N, logit_normal_cdf(0.5, 1.0)) < KS_LIMIT + 1 / N
    assert index.min() >= 0 and index.max() <= N - 1


# -- shifts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [0.5, 1.0, 3.0, 6.0])
def test_a_fixed_shift_maps_the_median_and_replaces_the_models_own(shift):
    for own in (1.0, 3.0):  # what the model's table was built with does not matter: the shift replaces it
        sched = flow_schedule(own)
        normal = TimestepSampling("logit_normal", shift=shift).sigmas(sched, DRAWS, gen(3))
        assert float(normal.median()) == pytest.approx(shift / (1 + shift), abs=0.01)  # u = 1/2 ↦ s/(1+s)
        uniform = TimestepSampling(shift=shift).sigmas(sched, DRAWS, gen(4))
        # uniform time, shifted: P(σ ≤ x) = unshift(x), the inverse shift being the shift by 1/s
        assert ks_distance(uniform, lambda x: shifted(x, 1 / shift)) < KS_LIMIT


def test_uniform_at_the_models_own_shift_is_its_table_distribution():
    """Continuous uniform time at the model's own shift has the distribution of the default table draws."""
    sched = flow_schedule(3.0)
    continuous = TimestepSampling(shift=3.0).sigmas(sched, DRAWS, gen(5))
    table = TimestepSampling().sigmas(sched, DRAWS, gen(6))
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert float(continuous.quantile(q)) == pytest.approx(float(table.quantile(q)), abs=0.01)


def test_resolution_shift_grows_with_the_latent_size_and_gets_the_shape():
    seen = []

    def shift_for(shape):  # a made-up resolution-dependent sampling: shift 1 at 32² latents, 4 at 128²
        seen.append(shape)
        return shape[-1] * shape[-2] / 32 ** 2

    sched = flow_schedule(2.0, shift_for=shift_for)
    sampling = TimestepSampling("logit_normal", resolution_shift=True)
    medians = []
    for side in (32, 64, 128):
        sigma = sampling.sigmas(sched, DRAWS, gen(side), (2, 16, side, side))
        s = (side / 32) ** 2
        medians.append(float(sigma.median()))
        assert medians[-1] == pytest.approx(s / (1 + s), abs=0.01)
    assert medians == sorted(medians) and medians[0] == pytest.approx(0.5, abs=0.01)
    assert seen == [(2, 16, 32, 32), (2, 16, 64, 64), (2, 16, 128, 128)]


# -- min-SNR-γ ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1.0, 5.0, 20.0])
def test_min_snr_weights_match_the_formula_and_are_at_most_one(gamma):
    sigma = eps_schedule().sigmas
    snr = 1 / sigma.double() ** 2
    capped = torch.minimum(snr, torch.tensor(gamma, dtype=torch.float64))
    eps = TimestepSampling(min_snr_gamma=gamma).loss_weights(eps_schedule("eps"), sigma)
    v = TimestepSampling(min_snr_gamma=gamma).loss_weights(eps_schedule("v"), sigma)
    torch.testing.assert_close(eps.double(), capped / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), capped / (snr + 1), rtol=1e-6, atol=0)
    assert eps.dtype == v.dtype == torch.float32
    assert float(eps.max()) <= 1 and float(v.max()) <= 1 and float(v.min()) > 0
    assert torch.all(eps[snr <= gamma] == 1)  # no capping where the SNR is below γ
    assert torch.all(v < eps)


@pytest.mark.parametrize("prediction", ["flow", "x0", "other", None])
def test_min_snr_is_refused_for_other_models_naming_it(prediction):
    sched = flow_schedule() if prediction == "flow" else eps_schedule(prediction)
    with pytest.raises(ValueError, match=r"^min_snr_gamma: .*'" + (prediction or "other") + "'"):
        TimestepSampling(min_snr_gamma=5).loss_weights(sched, sched.sigmas[:3])
    with pytest.raises(ValueError, match=r"^min_snr_gamma"):
        TimestepSampling(min_snr_gamma=5).check(sched)


# -- noise offset ---------------------------------------------------------------------------------------------------
def test_noise_offset_adds_one_draw_per_sample_and_channel_after_the_noise():
    shape = torch.Size((3, 4, 2, 5, 5))  # a video latent: the offset is the same over frames and pixels
    ours, plain = gen(8), gen(8)
    noise = TimestepSampling(noise_offset=0.1).noise(shape, ours)
    expected = torch.randn(shape, generator=plain) + 0.1 * torch.randn((3, 4, 1, 1, 1), generator=plain)
    assert torch.equal(noise, expected)
    assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=plain))


def test_noise_offset_spreads_the_per_channel_means_by_the_offset():
    shape, offset = torch.Size((2000, 4, 8, 8)), 0.3
    plain = TimestepSampling().noise(shape, gen(9)).mean(dim=(2, 3))
    means = TimestepSampling(noise_offset=offset).noise(shape, gen(9)).mean(dim=(2, 3))
    # a mean of 64 standard normals has variance 1/64; the offset adds offset² to it
    assert float(plain.std()) == pytest.approx(1 / 8, rel=0.03)
    assert float(means.std()) == pytest.approx(math.sqrt(offset ** 2 + 1 / 64), rel=0.03)
    assert float(means.mean()) == pytest.approx(0.0, abs=0.02)
    # within an image, the offset moves every pixel of a channel alike: the spread around the channel mean is unchanged
    noise = TimestepSampling(noise_offset=offset).noise(shape, gen(10))
    assert float((noise - noise.mean(dim=(2, 3), keepdim=True)).std()) == pytest.approx(math.sqrt(63 / 64), rel=0.01)


# -- refusals -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields,named", [
    (dict(kind="cosine"), "timestep_sampling"),
    (dict(logit_mean=float("inf")), "logit_mean"),
    (dict(logit_mean="0"), "logit_mean"),
    (dict(logit_std=0.0), "logit_std"),
    (dict(logit_std=-1.0), "logit_std"),
    (dict(logit_std=float("nan")), "logit_std"),
    (dict(shift=-1.0), "shift"),
    (dict(shift=float("nan")), "shift"),
    (dict(shift=True), "shift"),
    (dict(resolution_shift=1), "resolution_shift"),
    (dict(shift=3.0, resolution_shift=True), "shift, resolution_shift"),
    (dict(min_snr_gamma=-5.0), "min_snr_gamma"),
    (dict(min_snr_gamma=float("inf")), "min_snr_gamma"),
    (dict(noise_offset=-0.1), "noise_offset"),
    (dict(noise_offset=None), "noise_offset"),
])
def test_invalid_values_are_refused_naming_the_field(fields, named):
    with pytest.raises(ValueError, match="^" + named + ": "):
        TimestepSampling(**fields)


@pytest.mark.parametrize("fields,sched,named", [
    (dict(shift=3.0), eps_schedule("eps"), "shift"),
    (dict(shift=3.0), eps_schedule(None), "shift"),
    (dict(resolution_shift=True), eps_schedule("v"), "resolution_shift"),
    (dict(resolution_shift=True), flow_schedule(3.0), "resolution_shift"),  # a fixed-shift flow model
    (dict(resolution_shift=True), flow_schedule(3.0, shift_for=lambda shape: None), "resolution_shift"),
])
def test_options_the_model_has_no_use_for_are_refused_naming_the_field(fields, sched, named):
    sampling = TimestepSampling(**fields)
    with pytest.raises(ValueError, match="^" + named + ": "):
        sampling.sigmas(sched, 4, gen(0), (4, 16, 8, 8))
    with pytest.raises(ValueError, match="^" + named + ": "):
        sampling.check(sched, (4, 16, 8, 8))


def test_resolution_shift_needs_the_latent_shape():
    sched = flow_schedule(shift_for=lambda shape: 2.0)
    with pytest.raises(ValueError, match="^resolution_shift: needs the latents' shape"):
        TimestepSampling(resolution_shift=True).sigmas(sched, 4, gen(0))


# -- through the training loop --------------------------------------------------------------------------------------
class RecordingFlow(FlowSchedule):
    """The loop's flow fake with a 1000-entry table and a resolution-dependent shift that records what it is asked."""

    prediction = "flow"

    def __init__(self):
        super().__init__()
        self.sigmas = torch.arange(1, N + 1, dtype=torch.float32) / N
        self.asked: list[tuple[int, ...]] = []

    def flow_shift_for(self, shape):
        self.asked.append(shape)
        return 2.0


def test_the_loop_hands_the_resolution_shift_each_micro_batchs_latent_shape():
    net, aset, groups, _, _ = toy_problem(0)
    sched = RecordingFlow()

    def denoise(x_t, sigma, ids):
        return sched.denoised(x_t, sigma, net(x_t))

    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched,
                            loop.Settings(steps=4, batch_size=2, timesteps=TimestepSampling(resolution_shift=True)),
                            gen(0))
    assert len(result.losses) == 4 and all(math.isfinite(v) for v in result.losses)
    assert len(sched.asked) == 4 and {s[1:] for s in sched.asked} <= {g.shape for g in groups}


def test_a_run_with_every_option_trains_and_differs_from_the_default():
    net, aset, groups, sched, denoise = toy_problem(0)
    sched.prediction = "eps"
    before = eval_loss(aset, net, groups, sched, denoise)
    options = TimestepSampling("logit_normal", logit_mean=-0.5, min_snr_gamma=5.0, noise_offset=0.05)
    with attached(net, aset):
        result = loop.train(aset.trainable(), groups, denoise, sched,
                            loop.Settings(steps=30, batch_size=2, learning_rate=0.05, optimizer="Adam",
                                          timesteps=options), gen(0))
    assert all(math.isfinite(v) for v in result.losses) and eval_loss(aset, net, groups, sched, denoise) < before
    net2, aset2, groups2, sched2, denoise2 = toy_problem(0)
    with attached(net2, aset2):
        default = loop.train(aset2.trainable(), groups2, denoise2, sched2,
                             loop.Settings(steps=30, batch_size=2, learning_rate=0.05, optimizer="Adam"), gen(0))
    assert result.losses != default.losses


# -- ComfyUI's own model_sampling --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def comfy():
    """ComfyUI's model_sampling module, this pack's comfy_bridge and ComfyUI's advanced model nodes, or a skip."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
        import harness

        harness.put_comfyui_on_path()
        harness.load_pack()
        import comfy.model_sampling as model_sampling
        import comfy_extras.nodes_model_advanced as advanced
        from lora_trainer.nodes import comfy_bridge
    except Exception as e:  # no ComfyUI checkout here: the fakes above cover the training side
        pytest.skip(f"ComfyUI is not importable: {e}")
    return SimpleNamespace(ms=model_sampling, advanced=advanced, bridge=comfy_bridge)


def sampling(comfy, base: str, prediction: str, **parameters):
    """A model_sampling object built the way ComfyUI's model_base builds one: (sampling base, prediction class)."""
    cls = type("ModelSampling", (getattr(comfy.ms, base), getattr(comfy.ms, prediction)), {})
    ms = cls(None)
    if parameters:
        ms.set_parameters(**parameters)
    return comfy.bridge.ComfySchedule(ms, torch.device("cpu"))


@pytest.mark.parametrize("base,cls,expected", [
    ("ModelSamplingDiscrete", "EPS", "eps"),
    ("ModelSamplingDiscrete", "V_PREDICTION", "v"),
    ("ModelSamplingDiscrete", "X0", "x0"),
    ("ModelSamplingDiscrete", "IMG_TO_IMG", "x0"),
    ("ModelSamplingDiscreteFlow", "CONST", "flow"),
    ("ModelSamplingFlux", "CONST", "flow"),
    ("ModelSamplingContinuousEDM", "EDM", "other"),
    ("ModelSamplingContinuousV", "V_PREDICTION", "v"),
    ("ModelSamplingCosmosRFlow", "COSMOS_RFLOW", "other"),
])
def test_comfy_schedule_names_the_prediction(comfy, base, cls, expected):
    assert sampling(comfy, base, cls).prediction == expected


@pytest.mark.parametrize("base,parameters,own", [
    ("ModelSamplingDiscreteFlow", dict(shift=3.0), 3.0),
    ("ModelSamplingDiscreteFlow", dict(shift=1.73, multiplier=1.0), 1.73),
    ("ModelSamplingFlux", dict(shift=1.15), math.exp(1.15)),
])
def test_comfy_flow_shift_is_the_one_its_table_is_built_from(comfy, base, parameters, own):
    sched = sampling(comfy, base, "CONST", **parameters)
    assert sched.flow_shift == pytest.approx(own)
    n = len(sched.sigmas)
    torch.testing.assert_close(shifted(torch.arange(1, n + 1, dtype=torch.float64) / n, sched.flow_shift).float(),
                               sched.sigmas, rtol=1e-5, atol=1e-6)
    # draws pushed to both ends (where sigmoid gives exactly 0 and 1) stay valid flow sigmas, never 0
    extreme = TimestepSampling("logit_normal", logit_std=1000.0).sigmas(sched, 100, gen(0))
    assert 0 < float(extreme.min()) and float(extreme.max()) == 1.0


class FakePatcher:
    """Just what ComfyUI's ModelSampling* nodes touch of a MODEL."""

    def __init__(self):
        self.model = SimpleNamespace(model_config=None)
        self.object_patches = {}

    def clone(self):
        return FakePatcher()

    def add_object_patch(self, name, value):
        self.object_patches[name] = value


def test_comfy_resolution_shift_is_what_the_model_sampling_flux_node_gives(comfy):
    sched = sampling(comfy, "ModelSamplingFlux", "CONST", shift=1.15)
    shifts = []
    for height, width in [(32, 32), (64, 64), (64, 96), (128, 128), (192, 160)]:
        ours = sched.flow_shift_for((1, 16, height, width))
        patched, = comfy.advanced.ModelSamplingFlux().patch(FakePatcher(), max_shift=1.15, base_shift=0.5,
                                                            width=8 * width, height=8 * height)
        assert math.log(ours) == pytest.approx(patched.object_patches["model_sampling"].shift, rel=1e-9)
        shifts.append(ours)
    assert shifts == sorted(shifts) and shifts[3] == pytest.approx(sched.flow_shift)  # 1024² is the model's own
    assert sched.flow_shift_for((2, 16, 1, 64, 64)) == shifts[1]  # one-frame 5-D latents (Qwen-Image's)
    # and the drawn sigmas follow it: the middle time lands at s/(1+s)
    for side in (32, 128):
        shape = (1, 16, side, side)
        sigma = TimestepSampling("logit_normal", resolution_shift=True).sigmas(sched, DRAWS, gen(side), shape)
        s = sched.flow_shift_for(shape)
        assert float(sigma.median()) == pytest.approx(s / (1 + s), abs=0.01)


def test_comfy_samplings_without_a_resolution_shift_have_none(comfy):
    flux = sampling(comfy, "ModelSamplingFlux", "CONST")
    assert flux.flow_shift_for((1, 128, 64, 64)) is None  # Flux.2-like 128-channel latents: another layout
    assert flux.flow_shift_for((1, 16, 3, 64, 64)) is None  # several frames
    assert sampling(comfy, "ModelSamplingDiscreteFlow", "CONST", shift=3.0).flow_shift_for((1, 16, 64, 64)) is None
    assert sampling(comfy, "ModelSamplingDiscrete", "EPS").flow_shift_for((1, 4, 64, 64)) is None
    with pytest.raises(ValueError, match="^resolution_shift: "):
        TimestepSampling(resolution_shift=True).check(sampling(comfy, "ModelSamplingDiscreteFlow", "CONST"),
                                                      (1, 16, 64, 64))


@pytest.mark.parametrize("cls", ["EPS", "V_PREDICTION"])
def test_comfy_min_snr_weighs_the_x0_space_loss_by_min_snr_gamma(comfy, cls):
    """With the model's own output scale, the weighted native loss of an x0 error d is min(SNR, γ)·mean(d²): what
    min-SNR-γ means, for ε- and v-prediction alike."""
    sched = sampling(comfy, "ModelSamplingDiscrete", cls)
    gamma = 5.0
    sigma = sched.sigmas[torch.tensor([0, 100, 300, 600, 999])]
    x0 = torch.randn(5, 4, 6, 6, generator=gen(11))
    d = 0.01 * torch.randn(5, 4, 6, 6, generator=gen(12))
    error = objectives.native_error(x0 + d, x0, sched.output_scale(sigma, x0))
    weights = TimestepSampling(min_snr_gamma=gamma).loss_weights(sched, sigma)
    weighted = objectives.per_sample_loss(error, "MSE") * weights
    snr = 1 / sigma.double() ** 2
    expected = snr.clamp(max=gamma) * d.double().square().flatten(1).mean(1)
    torch.testing.assert_close(weighted.double(), expected, rtol=1e-4, atol=0)


def test_comfy_flow_models_refuse_min_snr(comfy):
    for base in ("ModelSamplingDiscreteFlow", "ModelSamplingFlux"):
        with pytest.raises(ValueError, match="^min_snr_gamma: .*'flow'"):
            TimestepSampling(min_snr_gamma=5.0).check(sampling(comfy, base, "CONST"))
