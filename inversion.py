"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al.) and the container for its result.

The math follows the reference number for number: coefficients are the scheduler's float32 ``alphas_cumprod``
entries raised to the power 0.5 as 0-dim tensors, "previous" timesteps are ``t - num_train_timesteps // T``, and
the noisy trajectory is sampled with one independent draw per timestep, from the least noisy to the noisiest.
"""

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import randn_tensor
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT_NAME = "cross-image-attention-inversion"
FORMAT_VERSION = "1"
_METADATA_FIELDS = (
    "prompt",
    "num_inference_steps",
    "skip_steps",
    "guidance_scale",
    "height",
    "width",
    "reference_freeu",
)


@dataclass
class InversionResult:
    """An inverted image batch: where denoising starts and the noise maps that reproduce the image.

    Args:
        latents (`torch.Tensor`): `[B, C, h, w]`, the inverted latent at the first denoising timestep (the
            reference's `x[skip_steps]`).
        noise (`torch.Tensor`): `[B, N, C, h, w]`, the edit-friendly noise maps `z[skip_steps:]` in denoising order
            (the last one is zero).
        timesteps (`torch.Tensor`): `[N]`, the denoising timesteps the noise maps belong to.
        prompt (`str`, *optional*): The prompt used for inversion.
        num_inference_steps (`int`, *optional*): Length `T` of the full schedule.
        skip_steps (`int`, *optional*): Steps skipped at the noisy end (`N = T - skip_steps`).
        guidance_scale (`float`, *optional*): Classifier-free guidance scale used during inversion.
        height (`int`, *optional*), width (`int`, *optional*): Image size in pixels.
        reference_freeu (`bool`, *optional*): Whether the reference's FreeU variant was active in the UNet calls.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompt: str | None = None
    num_inference_steps: int | None = None
    skip_steps: int | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    reference_freeu: bool | None = None

    def __post_init__(self):
        for name in ("latents", "noise", "timesteps"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"InversionResult.{name} must be a torch.Tensor, got {type(getattr(self, name))}.")
        if self.latents.ndim != 4:
            raise ValueError(f"InversionResult.latents must be [B, C, h, w], got shape {tuple(self.latents.shape)}.")
        if self.noise.ndim != 5 or self.noise.shape[0] != self.latents.shape[0]:
            raise ValueError(
                f"InversionResult.noise must be [B, N, C, h, w] with B = {self.latents.shape[0]}, "
                f"got shape {tuple(self.noise.shape)}."
            )
        if self.noise.shape[2:] != self.latents.shape[1:]:
            raise ValueError(
                f"InversionResult.noise maps have shape {tuple(self.noise.shape[2:])} but the latents are "
                f"{tuple(self.latents.shape[1:])}."
            )
        if self.timesteps.ndim != 1 or self.timesteps.shape[0] != self.noise.shape[1]:
            raise ValueError(
                f"InversionResult.timesteps must be [N] with N = {self.noise.shape[1]} noise maps, "
                f"got shape {tuple(self.timesteps.shape)}."
            )

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    def metadata(self) -> dict:
        """The optional settings, by name."""
        return {name: getattr(self, name) for name in _METADATA_FIELDS}

    def to(self, *args, **kwargs) -> "InversionResult":
        """Move or cast like `torch.Tensor.to`; timesteps keep their integer dtype."""
        timesteps = self.timesteps.to(device=self.latents.to(*args, **kwargs).device)
        return InversionResult(
            self.latents.to(*args, **kwargs), self.noise.to(*args, **kwargs), timesteps, **self.metadata()
        )

    def select(self, indices: list[int]) -> "InversionResult":
        """The inversions of the batch entries ``indices``, in that order."""
        index = torch.as_tensor(indices, device=self.latents.device)
        return InversionResult(self.latents[index], self.noise[index], self.timesteps, **self.metadata())

    @classmethod
    def cat(cls, results: list["InversionResult"]) -> "InversionResult":
        """Concatenate inversions along the batch; they must share timesteps (metadata of the first is kept)."""
        results = list(results) if isinstance(results, (list, tuple)) else results
        if not isinstance(results, list) or not results:
            raise ValueError(f"`results` must be a non-empty list of InversionResult, got {results!r}.")
        if not all(isinstance(r, InversionResult) for r in results):
            raise TypeError("`results` must hold InversionResult objects only.")
        first = results[0]
        for other in results[1:]:
            if not torch.equal(other.timesteps.cpu(), first.timesteps.cpu()):
                raise ValueError("Cannot concatenate inversions made with different timesteps.")
        return cls(
            torch.cat([r.latents for r in results]),
            torch.cat([r.noise for r in results]),
            first.timesteps,
            **first.metadata(),
        )

    def save(self, path: str) -> None:
        """Write a safetensors file; the settings go into its header metadata as JSON values."""
        tensors = {
            "latents": self.latents.detach().cpu().contiguous(),
            "noise": self.noise.detach().cpu().contiguous(),
            "timesteps": self.timesteps.detach().cpu().contiguous(),
        }
        metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        metadata.update({name: json.dumps(value) for name, value in self.metadata().items()})
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "InversionResult":
        """Read a file written by [`InversionResult.save`] (safetensors only; nothing is unpickled)."""
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                missing = {"latents", "noise", "timesteps"} - names
                if metadata.get("format") != FORMAT_NAME or missing:
                    raise ValueError(
                        f"{path} is not an InversionResult file (format {metadata.get('format')!r}, "
                        f"missing tensors {sorted(missing)})."
                    )
                tensors = {name: handle.get_tensor(name) for name in ("latents", "noise", "timesteps")}
        except (OSError, RuntimeError, SafetensorError) as error:  # unreadable, or not safetensors at all
            raise ValueError(f"Cannot read an InversionResult from {path}: {error}") from error
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}."
            )
        settings = {name: read_setting(metadata[name], name, path) for name in _METADATA_FIELDS if name in metadata}
        for name in ("latents", "noise"):
            if not tensors[name].is_floating_point() or not torch.isfinite(tensors[name]).all():
                raise ValueError(f"{path} holds non-finite {name} (NaN or infinity), or not floats; invert again.")
        try:
            return cls(**tensors, **settings)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a valid InversionResult file: {error}") from None


# The type of each setting in a file's metadata; None is always allowed (unknown).
_METADATA_TYPES = {
    "prompt": (str,),
    "num_inference_steps": (int,),
    "skip_steps": (int,),
    "guidance_scale": (int, float),
    "height": (int,),
    "width": (int,),
    "reference_freeu": (bool,),
}


def read_setting(text: str, name: str, path) -> object:
    """One setting of a file's metadata: a JSON scalar of the field's type (a file may come from anywhere, and a
    deeply nested value would make `json.loads` raise RecursionError)."""
    if len(text) > 10_000:
        raise ValueError(f"{path}: the metadata field {name!r} is too long ({len(text)} characters).")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise ValueError(f"{path}: the metadata field {name!r} is not a JSON value.") from None
    kinds = _METADATA_TYPES[name]
    is_bool = isinstance(value, bool)
    if value is not None and (not isinstance(value, kinds) or (is_bool and bool not in kinds)):
        raise ValueError(f"{path}: the metadata field {name!r} must be a {kinds[0].__name__}, got {value!r}.")
    return value


@dataclass
class DDPMCoefficients:
    """The float32 0-dim quantities of one reverse step from ``t`` to its previous timestep (eta = 1)."""

    alpha_prod_t: torch.Tensor
    alpha_prod_t_prev: torch.Tensor
    variance: torch.Tensor


def ddpm_coefficients(scheduler, timestep: int) -> DDPMCoefficients:
    """Coefficients as the reference computes them (not ``scheduler.step``, to keep its exact float ops).

    The previous timestep is ``t - num_train_timesteps // num_inference_steps``; before 0 the scheduler's
    ``final_alpha_cumprod`` is used, which is ``alphas_cumprod[0]`` for SD's ``set_alpha_to_one=False``.
    """
    timestep = int(timestep)
    alphas_cumprod = scheduler.alphas_cumprod
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = alphas_cumprod[timestep]
    alpha_prod_t_prev = alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    variance = ((1 - alpha_prod_t_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_t_prev)
    return DDPMCoefficients(alpha_prod_t, alpha_prod_t_prev, variance)


def ddpm_posterior_mean(sample: torch.Tensor, noise_pred: torch.Tensor, coeffs: DDPMCoefficients) -> torch.Tensor:
    """The deterministic part of the eta = 1 DDPM step: ``sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - var) eps``."""
    pred_original_sample = (sample - (1 - coeffs.alpha_prod_t) ** 0.5 * noise_pred) / coeffs.alpha_prod_t**0.5
    direction = (1 - coeffs.alpha_prod_t_prev - coeffs.variance) ** 0.5 * noise_pred
    return coeffs.alpha_prod_t_prev**0.5 * pred_original_sample + direction


def ddpm_step(sample: torch.Tensor, noise_pred: torch.Tensor, noise: torch.Tensor, coeffs: DDPMCoefficients):
    """One edit-friendly DDPM step: the posterior mean plus ``sigma * z`` with the given noise map ``z``."""
    return ddpm_posterior_mean(sample, noise_pred, coeffs) + coeffs.variance**0.5 * noise


def draw_trajectory_noise(
    latent_shape: tuple, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One standard-normal draw `[1, C, h, w]` of the forward trajectory, in float32 (as diffusers' `randn_tensor`:
    on the generator's device, then moved), so that a seed gives the same noise in any dtype."""
    return randn_tensor((1, *latent_shape), generator=generator, device=torch.device(device), dtype=torch.float32)


def skip_trajectory_draws(
    num_inference_steps: int, latent_shape: tuple, generator: torch.Generator | None, device="cpu"
) -> None:
    """Advance ``generator`` past one image's inversion draws (one per step of the full schedule), without a model:
    an image inverted next from the same generator then gets the noise it would get after a real inversion."""
    for _ in range(num_inference_steps):
        draw_trajectory_noise(latent_shape, generator, device)


def sample_noisy_trajectory(
    clean_latents: torch.Tensor,
    scheduler,
    timesteps: torch.Tensor,
    draw_noise: Callable[[], torch.Tensor],
) -> list[torch.Tensor]:
    """Independent forward samples ``x[k] = sqrt(ab[t_k]) x0 + sqrt(1 - ab[t_k]) e_k`` for every timestep index.

    ``draw_noise`` is called once per timestep, from the least noisy (last index) to the noisiest (index 0): the
    reference's draw order, which later draws (the next image) depend on.

    Returns:
        A list of ``len(timesteps) + 1`` latents, entry ``k`` at ``timesteps[k]`` and the last one ``x0`` itself.
    """
    alphas_cumprod = scheduler.alphas_cumprod
    sqrt_one_minus = (1 - alphas_cumprod) ** 0.5
    trajectory = [None] * len(timesteps)
    for index in reversed(range(len(timesteps))):
        t = int(timesteps[index])
        trajectory[index] = clean_latents * alphas_cumprod[t] ** 0.5 + draw_noise() * sqrt_one_minus[t]
    return trajectory + [clean_latents]


def extract_noise_map(
    sample: torch.Tensor, less_noisy_sample: torch.Tensor, noise_pred: torch.Tensor, coeffs: DDPMCoefficients
):
    """The noise map ``z`` that takes ``sample`` to ``less_noisy_sample`` in one DDPM step, and the latent that step
    re-computes from it (``mu + sigma z``, equal to ``less_noisy_sample`` up to rounding; the reference keeps it)."""
    mean = ddpm_posterior_mean(sample, noise_pred, coeffs)
    sigma = coeffs.variance**0.5
    noise = (less_noisy_sample - mean) / sigma
    return noise, mean + sigma * noise


def invert_edit_friendly(
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    clean_latents: torch.Tensor,
    conditional: torch.Tensor,
    unconditional: torch.Tensor,
    all_timesteps: torch.Tensor,
    skip_steps: int,
    guidance_scale: float,
    generators: list,
    progress_bar: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Edit-friendly DDPM inversion of a batch of latents, all images batched in each UNet call.

    Args:
        predict_noise: ``(latents, timestep, embeddings) -> eps`` in float32.
        scheduler: A `DDIMScheduler` set to the `T`-step schedule.
        clean_latents: `[K, C, h, w]` encoded images.
        conditional, unconditional: `[K, 77, D]` prompt and empty-prompt embeddings.
        all_timesteps: The full `T`-step schedule, noisiest first.
        skip_steps: `S`; only `x[S]` and `z[S:]` are returned.
        guidance_scale: Classifier-free guidance scale of the noise predictions.
        generators: One entry per image; images sharing a generator draw one after the other.
        progress_bar: ``progress_bar(total=...)`` context manager factory (the pipeline's), or None.

    Returns:
        `(latents [K, C, h, w], noise [K, T - S, C, h, w])`.
    """
    num_steps = len(all_timesteps)
    latent_shape = tuple(clean_latents.shape[1:])
    trajectories = []
    for image, generator in enumerate(generators):
        # Quirk kept for seed compatibility: the reference draws one noise per timestep for all T steps, least noisy
        # first, image after image, even for the steps it later skips.
        def draw(generator=generator):
            return draw_trajectory_noise(latent_shape, generator, clean_latents.device)

        trajectories.append(sample_noisy_trajectory(clean_latents[image : image + 1], scheduler, all_timesteps, draw))

    # Each noise map depends only on the sampled x[k], x[k+1] and the prediction at x[k], so only the steps that
    # denoising uses are computed: k >= S, and k = S - 1 whose re-computed x[S] (mu + sigma z, equal to the sample up
    # to rounding) is where the reference starts. z[T-1] is zeroed by the reference, so its UNet call is skipped too.
    first_step = max(skip_steps - 1, 0)
    noise_maps = torch.zeros((len(generators), num_steps - skip_steps, *latent_shape), device=clean_latents.device)
    start_latents = torch.cat([trajectory[skip_steps] for trajectory in trajectories])
    embeddings = torch.cat([unconditional, conditional])
    bar = progress_bar(total=num_steps - 1 - first_step) if progress_bar is not None else nullcontext()
    with bar:
        for k in range(num_steps - 2, first_step - 1, -1):  # from the least noisy step to the noisiest
            t = all_timesteps[k]
            sample = torch.cat([trajectory[k] for trajectory in trajectories])
            less_noisy = torch.cat([trajectory[k + 1] for trajectory in trajectories])
            eps_uncond, eps_cond = predict_noise(torch.cat([sample, sample]), t, embeddings).chunk(2)
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            noise, recomputed = extract_noise_map(sample, less_noisy, eps, ddpm_coefficients(scheduler, t))
            if k >= skip_steps:
                noise_maps[:, k - skip_steps] = noise
            if k + 1 == skip_steps:
                start_latents = recomputed
            if progress_bar is not None:
                bar.update()
    return start_latents, noise_maps
