"""Time, memory and UNet work of one appearance transfer, next to the reference implementation's UNet work.

    python benchmarks/benchmark.py                                   # SD 1.5-shaped, random weights, 512 px, defaults
    python benchmarks/benchmark.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --device cuda --dtype float16
    python benchmarks/benchmark.py --device cpu --height 256 --width 256 --num_inference_steps 10 --skip_steps 3 \
        --cross_attn_32_range 0 10 --cross_attn_64_range 0 10 --adain_range 1 10 --masked_adain

Without ``--model`` the components are built from SD 1.5's configs with random weights (same shapes, so the same
cost; the images are noise) and a byte-level tokenizer, so the benchmark needs no download. It reports seconds for
inversion and for denoising (with the decode), the peak memory (CUDA peak allocated, or the process's peak RSS on
CPU), and the UNet sample-forwards counted by a hook, next to the reference's count for the same settings:
``4 T`` for inversion (two images, every step, uncond and cond apart) plus ``6 (T - S)`` for denoising (two passes
of the 3-image batch per step), per pair. Results are printed as a table and written as JSON (``--output``).
"""

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import PIL.Image
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from cross_image_attention import CrossImageAttentionPipeline
from cross_image_attention.pipeline_cross_image import call_defaults

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
TOKENIZER = REPO_ROOT / "tests" / "data" / "tiny_sd" / "tokenizer"  # byte-level; ids fit CLIP's vocabulary
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# Stable Diffusion 1.5's component configs (the parts that set shapes and cost).
SD15_UNET = {
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "sample_size": 64,
}
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_TEXT_ENCODER = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def parse_args(argv=None) -> argparse.Namespace:
    defaults = call_defaults()  # the pipeline's defaults, never restated
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hub id or local folder; default: SD 1.5 shapes with random weights")
    for name in ("height", "width", "num_inference_steps", "skip_steps"):
        parser.add_argument(f"--{name}", type=int, default=defaults[name])
    parser.add_argument("--pairs", type=int, default=1, help="image pairs in one call")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--masked_adain", action="store_true", help="self-segmentation masks (the CLI default)")
    # The default ranges start at step 10; short schedules pass e.g. `0 10` so that every feature runs.
    for name in ("cross_attn_32_range", "cross_attn_64_range", "adain_range"):
        parser.add_argument(f"--{name}", type=int, nargs=2, default=list(defaults[name]), metavar=("START", "END"))
    parser.add_argument("--output", type=Path, default=Path("benchmark.json"), help="JSON results file")
    return parser.parse_args(argv)


def build_pipeline(args, pipeline_class=CrossImageAttentionPipeline):
    """`args.model` as ``pipeline_class`` (any SD 1.x/2.x pipeline of this project), or SD 1.5's shapes with random
    weights, in `args.dtype` on `args.device`."""
    dtype = DTYPES[args.dtype]
    if args.model:
        pipe = pipeline_class.from_pretrained(
            args.model, dtype=dtype, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    else:
        torch.manual_seed(0)
        pipe = pipeline_class(
            vae=AutoencoderKL(**SD15_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**SD15_TEXT_ENCODER)),
            tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER),
            unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=DDIMScheduler(**SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        if dtype != torch.float32:  # casting warns about fp32-only modules even when there are none; skip it
            pipe = pipe.to(dtype=dtype)
    return pipe.to(args.device)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def measure(phase, device: torch.device, counter: list) -> tuple:
    """Run ``phase()``; its result, seconds, peak memory (GiB) and UNet sample-forwards."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    counter.clear()
    start = time.perf_counter()
    result = phase()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start, peak_memory_gib(device), sum(counter)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    pipe = build_pipeline(args)
    pipe.set_progress_bar_config(disable=True)
    counter = []
    pipe.unet.register_forward_pre_hook(
        lambda module, a, kw: counter.append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True
    )
    appearance = PIL.Image.open(EXAMPLES / "raccoon.jpg").convert("RGB")
    structure = PIL.Image.open(EXAMPLES / "chelsea.jpg").convert("RGB")
    settings = {
        "num_inference_steps": args.num_inference_steps,
        "skip_steps": args.skip_steps,
        "height": args.height,
        "width": args.width,
        "domain_name": "animal",
    }
    images = [appearance, structure] * args.pairs

    def invert():
        # Appearance then structure, pair after pair, from one generator: what the pipeline call itself does.
        inversions = pipe.invert(images, generator=torch.Generator().manual_seed(42), **settings)
        return inversions.select(list(range(0, len(images), 2))), inversions.select(list(range(1, len(images), 2)))

    def transfer(app, struct):
        return pipe(
            appearance_inversion=app,
            structure_inversion=struct,
            use_masked_adain=args.masked_adain,
            cross_attn_32_range=tuple(args.cross_attn_32_range),
            cross_attn_64_range=tuple(args.cross_attn_64_range),
            adain_range=tuple(args.adain_range),
            output_type="pil",
            **settings,
        )

    (app, struct), inversion_s, inversion_peak, inversion_forwards = measure(invert, device, counter)
    output, denoise_s, denoise_peak, denoise_forwards = measure(lambda: transfer(app, struct), device, counter)
    steps = args.num_inference_steps - args.skip_steps
    reference = args.pairs * (4 * args.num_inference_steps + 6 * steps)
    results = {
        "inversion_s": round(inversion_s, 3),
        "denoising_s": round(denoise_s, 3),
        "total_s": round(inversion_s + denoise_s, 3),
        "peak_memory_gib": round(max(inversion_peak, denoise_peak), 3),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "unet_sample_forwards": inversion_forwards + denoise_forwards,
        "unet_sample_forwards_inversion": inversion_forwards,
        "unet_sample_forwards_denoising": denoise_forwards,
        "reference_unet_sample_forwards": reference,
        "images": len(output.images),
        "settings": {**vars(args), "output": str(args.output), "model": args.model or "random SD 1.5 weights"},
        "machine": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    rows = [
        ("inversion", f"{inversion_s:.2f} s", f"{inversion_forwards}", f"{args.pairs * 4 * args.num_inference_steps}"),
        ("denoising + decode", f"{denoise_s:.2f} s", f"{denoise_forwards}", f"{args.pairs * 6 * steps}"),
        ("total", f"{inversion_s + denoise_s:.2f} s", f"{inversion_forwards + denoise_forwards}", f"{reference}"),
    ]
    print(f"{'phase':<20}{'time':>12}{'UNet forwards':>16}{'reference':>12}")
    for row in rows:
        print(f"{row[0]:<20}{row[1]:>12}{row[2]:>16}{row[3]:>12}")
    print(f"peak memory: {results['peak_memory_gib']:.2f} GiB ({results['peak_memory_kind']}); JSON: {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
