"""DDIM inversion for Free-Prompt-Editing, the optional null-text optimisation, and the container for their result.

The updates are the authors' hand-written DDIM steps, number for number (``shared/REFERENCE-FPE.md`` sections 4 and
6): every coefficient is the scheduler's float32 ``alphas_cumprod`` entry, a 0-dim tensor raised to the power 0.5,
and one step from noise level ``a`` to noise level ``b`` evaluates, in this order,
``x0 = (x - (1 - a)^0.5 eps) / a^0.5`` and ``b^0.5 x0 + (1 - b)^0.5 eps``. Inversion and denoising differ only in
which two levels they join.

Null-text inversion (Mokady et al., the authors' ``null_text_w_FPE.ipynb``, section 11) optimises one unconditional
embedding per denoising step so that guided DDIM steps retrace the unguided inversion.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

FORMAT_NAME = "free-prompt-editing-ddim-inversion"
FORMAT_VERSION = "1"
_METADATA_FIELDS = ("prompt", "guidance_scale", "height", "width")
_TENSOR_FIELDS = ("latents", "timesteps", "null_text_embeddings")

# Null-text optimisation constants of prompt-to-prompt's `NullInversion`, which the authors' notebook uses: Adam with
# learning rate 1e-2 * (1 - i / 100) at denoising step i, and an early stop once the step's loss is below
# `early_stop + i * 2e-5`.
NULL_TEXT_LEARNING_RATE = 1e-2
NULL_TEXT_LEARNING_RATE_DECAY_STEPS = 100
NULL_TEXT_EARLY_STOP_SLOPE = 2e-5
NULL_TEXT_INNER_STEPS = 10
NULL_TEXT_EARLY_STOP = 1e-5

NoisePrediction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------------------------
# The DDIM updates
# ------------------------------------------------------------------------------------------------------------------


def step_stride(scheduler) -> int:
    """Training timesteps between two inference timesteps (``D = 1000 // T``)."""
    return scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def inversion_alphas(scheduler, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels ``(from, to)`` of the inversion step that ends at ``timestep``.

    It starts at ``t - D``; below 0 that is the scheduler's ``final_alpha_cumprod`` (``alphas_cumprod[0]`` for SD's
    ``set_alpha_to_one=False``), so the first step treats the clean latent as a sample at that level. (The reference
    also clamps ``t - D`` to 999, which no schedule reaches.)

    Args:
        scheduler: A `DDIMScheduler` with its timesteps set.
        timestep: The inversion step's (noisier) end.
    """
    timestep = int(timestep)
    current = timestep - step_stride(scheduler)
    alpha_from = scheduler.alphas_cumprod[current] if current >= 0 else scheduler.final_alpha_cumprod
    return alpha_from, scheduler.alphas_cumprod[timestep]


def denoising_alphas(scheduler, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise levels ``(from, to)`` of the denoising step that leaves ``timestep``.

    Args:
        scheduler: A `DDIMScheduler` with its timesteps set.
        timestep: The denoising step's (noisier) start.
    """
    timestep = int(timestep)
    previous = timestep - step_stride(scheduler)
    # Quirk (section 6): the reference tests `previous > 0`, not `>= 0`; with SD's `steps_offset=1` `previous` is
    # never 0, and with `set_alpha_to_one=False` both branches give alphas_cumprod[0] anyway.
    alpha_to = scheduler.alphas_cumprod[previous] if previous > 0 else scheduler.final_alpha_cumprod
    return scheduler.alphas_cumprod[timestep], alpha_to


def ddim_update(
    sample: torch.Tensor, noise_pred: torch.Tensor, alpha_from: torch.Tensor, alpha_to: torch.Tensor
) -> torch.Tensor:
    """Deterministic DDIM move of ``sample`` from noise level ``alpha_from`` to ``alpha_to`` (either direction).

    Args:
        sample: The latents at ``alpha_from``.
        noise_pred: The (guided) noise prediction, float32.
        alpha_from, alpha_to: ``alphas_cumprod`` entries, float32 0-dim tensors.
    """
    pred_original_sample = (sample - (1 - alpha_from) ** 0.5 * noise_pred) / alpha_from**0.5
    return alpha_to**0.5 * pred_original_sample + (1 - alpha_to) ** 0.5 * noise_pred


def ddim_invert(
    clean_latents: torch.Tensor,
    scheduler,
    predict_noise: NoisePrediction,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """DDIM inversion along the scheduler's timesteps (``set_timesteps`` already called), least noisy first.

    Args:
        clean_latents: `[B, C, h, w]`, the encoded images.
        scheduler: A `DDIMScheduler` with its timesteps set.
        predict_noise: ``(latents, timestep) -> noise`` (guided or not), float32.
        on_step: Called after every step (a progress bar).

    Returns:
        The trajectory `[B, T+1, C, h, w]`: entry 0 the clean latents, entry ``j`` the latents after the inversion
        step that ends at ``timesteps[T - j]``, entry T the start of denoising.
    """
    trajectory = [clean_latents]
    for timestep in scheduler.timesteps.flip(0):
        noise_pred = predict_noise(trajectory[-1], timestep)
        trajectory.append(ddim_update(trajectory[-1], noise_pred, *inversion_alphas(scheduler, timestep)))
        if on_step is not None:
            on_step()
    return torch.stack(trajectory, dim=1)


def optimise_null_text(
    trajectory: torch.Tensor,
    scheduler,
    uncond_embeddings: torch.Tensor,
    cond_embeddings: torch.Tensor,
    predict_noise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    guidance_scale: float,
    inner_steps: int = NULL_TEXT_INNER_STEPS,
    early_stop: float = NULL_TEXT_EARLY_STOP,
    on_step: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Null-text optimisation of one image: an unconditional embedding per denoising step such that the guided DDIM
    step from the running latent lands on the inversion's next latent.

    At step ``i`` the embedding starts from step ``i - 1``'s result (the first from ``uncond_embeddings``) and takes
    up to ``inner_steps`` Adam steps on the mean squared error to ``trajectory[T - 1 - i]``; then the running latent
    takes the guided step with it.

    Args:
        trajectory: `[1, T+1, C, h, w]`, this image's inversion (made without guidance, as the reference).
        scheduler: A `DDIMScheduler` with its timesteps set.
        uncond_embeddings: `[1, L, D]`, the empty prompt's embedding, the starting point.
        cond_embeddings: `[1, L, D]`, the prompt's embedding.
        predict_noise: ``(latents, timestep, embeddings) -> noise``, differentiable in the embeddings.
        guidance_scale: The classifier-free guidance scale the embeddings are optimised for.
        inner_steps: Most Adam steps per denoising step.
        early_stop: Stop a step's optimisation once its loss is below ``early_stop + i * 2e-5``.
        on_step: Called after every denoising step (a progress bar).

    Returns:
        `[T, L, D]`, the optimised unconditional embedding of each denoising step.
    """
    num_steps = trajectory.shape[1] - 1
    latents, uncond = trajectory[:, num_steps], uncond_embeddings.detach()
    optimised = []
    for i, timestep in enumerate(scheduler.timesteps):
        alphas = denoising_alphas(scheduler, timestep)
        target = trajectory[:, num_steps - 1 - i]
        with torch.no_grad():
            noise_cond = predict_noise(latents, timestep, cond_embeddings)
        uncond = uncond.clone().requires_grad_(True)
        learning_rate = NULL_TEXT_LEARNING_RATE * (1.0 - i / NULL_TEXT_LEARNING_RATE_DECAY_STEPS)
        optimizer = torch.optim.Adam([uncond], lr=learning_rate)
        for _ in range(inner_steps):
            with torch.enable_grad():
                noise_uncond = predict_noise(latents, timestep, uncond)
                noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                loss = F.mse_loss(ddim_update(latents, noise_pred, *alphas), target)
                optimizer.zero_grad()
                loss.backward(inputs=[uncond])  # gradients for the embedding only, none left on the UNet
            optimizer.step()
            # Quirk of prompt-to-prompt's loop, kept: the stop test reads the loss from before the update just made.
            if loss.item() < early_stop + i * NULL_TEXT_EARLY_STOP_SLOPE:
                break
        uncond = uncond.detach()
        optimised.append(uncond)
        with torch.no_grad():
            noise_uncond, noise_cond = predict_noise(
                torch.cat([latents, latents]), timestep, torch.cat([uncond, cond_embeddings])
            ).chunk(2)
            noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
            latents = ddim_update(latents, noise_pred, *alphas)
        if on_step is not None:
            on_step()
    return torch.cat(optimised)


# ------------------------------------------------------------------------------------------------------------------
# The result
# ------------------------------------------------------------------------------------------------------------------


def _check_finite(tensor: torch.Tensor, name: str) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"DDIMInversionResult.{name} must be a floating-point tensor, got {tensor.dtype}.")
    if not torch.isfinite(tensor).all():
        raise ValueError(
            f"DDIMInversionResult.{name} holds non-finite values: the inversion diverged (in float16, try float32)."
        )


@dataclass
class DDIMInversionResult:
    """A DDIM-inverted image batch: the latent trajectory that teacher-forces the source branch of an edit.

    Only `latents` and `timesteps` are required; the settings are recorded when known.

    Args:
        latents (`torch.Tensor`): `[B, T+1, C, h, w]`: entry 0 the clean (encoded) latents, entry ``j`` the latents
            at the inversion step that ends at ``timesteps[T - j]``, entry T the start of denoising. A `[T+1, C, h, w]`
            tensor is taken as one image.
        timesteps (`torch.Tensor`): `[T]`, the denoising timesteps (decreasing), as ``scheduler.timesteps``.
        prompt (`str`, *optional*): The prompt of the inversion (the edit's source prompt).
        guidance_scale (`float`, *optional*): Classifier-free guidance scale of the inversion (with null-text
            embeddings: the scale they were optimised for).
        height (`int`, *optional*), width (`int`, *optional*): Image size in pixels.
        null_text_embeddings (`torch.Tensor`, *optional*): `[B, T, L, D]`, the optimised unconditional embedding of
            each denoising step (null-text inversion).
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    prompt: str | None = None
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    null_text_embeddings: torch.Tensor | None = None

    def __post_init__(self):
        if not isinstance(self.latents, torch.Tensor):
            raise TypeError(f"DDIMInversionResult.latents must be a torch.Tensor, got {type(self.latents).__name__}.")
        if self.latents.ndim == 4:
            self.latents = self.latents[None]
        if self.latents.ndim != 5 or self.latents.shape[1] < 2:
            raise ValueError(
                f"DDIMInversionResult.latents must be [B, T+1, C, h, w] with T >= 1, got {tuple(self.latents.shape)}."
            )
        _check_finite(self.latents, "latents")
        if not isinstance(self.timesteps, torch.Tensor):
            self.timesteps = torch.as_tensor(self.timesteps)
        num_steps = self.latents.shape[1] - 1
        if self.timesteps.shape != (num_steps,) or self.timesteps.is_floating_point():
            raise ValueError(
                f"DDIMInversionResult.timesteps must be [T] = [{num_steps}] integers, got shape "
                f"{tuple(self.timesteps.shape)} and dtype {self.timesteps.dtype}."
            )
        if self.null_text_embeddings is not None:
            embeddings = self.null_text_embeddings
            if not isinstance(embeddings, torch.Tensor) or embeddings.ndim != 4:
                raise ValueError("DDIMInversionResult.null_text_embeddings must be a [B, T, L, D] tensor.")
            if embeddings.shape[:2] != (self.batch_size, num_steps):
                raise ValueError(
                    f"DDIMInversionResult.null_text_embeddings must be [B, T, L, D] with B = {self.batch_size} and "
                    f"T = {num_steps}, got {tuple(embeddings.shape)}."
                )
            _check_finite(embeddings, "null_text_embeddings")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise TypeError(f"DDIMInversionResult.prompt must be a string, got {type(self.prompt).__name__}.")

    @classmethod
    def coerce(cls, value, name: str) -> "DDIMInversionResult":
        """``value`` as this class. A result of another copy of this module (a pipeline loaded from a file and the
        installed package each have their own) is re-wrapped, which also validates it again.

        Args:
            value: A `DDIMInversionResult`, or any object with its fields.
            name: The argument's name, for errors.
        """
        if isinstance(value, cls):
            return value
        if not all(hasattr(value, field) for field in _TENSOR_FIELDS[:2]):
            raise TypeError(f"`{name}` must be a DDIMInversionResult, got {type(value).__name__}.")
        optional = {field: getattr(value, field, None) for field in (*_METADATA_FIELDS, "null_text_embeddings")}
        return cls(value.latents, value.timesteps, **optional)

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_inference_steps(self) -> int:
        return self.latents.shape[1] - 1

    def metadata(self) -> dict:
        """The optional settings, by name."""
        return {name: getattr(self, name) for name in _METADATA_FIELDS}

    def to(self, *args, **kwargs) -> "DDIMInversionResult":
        """Move or cast like `torch.Tensor.to`; timesteps keep their integer dtype."""
        latents = self.latents.to(*args, **kwargs)
        embeddings = self.null_text_embeddings
        return DDIMInversionResult(
            latents,
            self.timesteps.to(device=latents.device),
            null_text_embeddings=embeddings.to(*args, **kwargs) if embeddings is not None else None,
            **self.metadata(),
        )

    def select(self, indices: list[int]) -> "DDIMInversionResult":
        """The inversions of the batch entries ``indices``, in that order."""
        index = torch.as_tensor(indices, device=self.latents.device)
        embeddings = self.null_text_embeddings
        return DDIMInversionResult(
            self.latents[index],
            self.timesteps,
            null_text_embeddings=embeddings[index.to(embeddings.device)] if embeddings is not None else None,
            **self.metadata(),
        )

    def save(self, path: str) -> None:
        """Write a safetensors file; the settings go into its header metadata as JSON values.

        Args:
            path: The file to write.
        """
        tensors = {"latents": self.latents, "timesteps": self.timesteps}
        if self.null_text_embeddings is not None:
            tensors["null_text_embeddings"] = self.null_text_embeddings
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
        metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION}
        metadata.update({name: json.dumps(value) for name, value in self.metadata().items()})
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> "DDIMInversionResult":
        """Read a file written by [`DDIMInversionResult.save`] (safetensors only; nothing is unpickled).

        Args:
            path: The file to read.
            device: Where the tensors go.
        """
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                missing = {"latents", "timesteps"} - names
                if metadata.get("format") != FORMAT_NAME or missing:
                    raise ValueError(
                        f"{path} is not a DDIMInversionResult file (format {metadata.get('format')!r}, missing "
                        f"tensors {sorted(missing)})."
                    )
                tensors = {name: handle.get_tensor(name) for name in _TENSOR_FIELDS if name in names}
        except (OSError, RuntimeError, SafetensorError) as error:  # unreadable, or not safetensors at all
            raise ValueError(f"Cannot read a DDIMInversionResult from {path}: {error}") from error
        if metadata.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{path} has format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}."
            )
        settings = {name: json.loads(metadata[name]) for name in _METADATA_FIELDS if name in metadata}
        return cls(**tensors, **settings)
