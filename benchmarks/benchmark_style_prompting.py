"""Time, memory and model work of one Visual Style Prompting call, next to the authors' code's cost model.

    python benchmarks/benchmark_style_prompting.py --pipeline sdxl --device cuda --dtype float16   # 1024 px, 4 images
    python benchmarks/benchmark_style_prompting.py --pipeline sd --device cuda --dtype float16     # SD 1.5, 512 px
    python benchmarks/benchmark_style_prompting.py --pipeline sdxl --reference_image   # the real-image flow
    python benchmarks/benchmark_style_prompting.py --tiny --pipeline sdxl              # tiny CPU model (tests)

The components are built from SDXL's or SD 1.5's configs with random weights (same shapes, so the same cost; the
images are noise) and a byte-level tokenizer, so nothing is downloaded; ``--tiny`` uses the tests' tiny configs. One
call generates ``--images`` images (default 4) next to one reference. Reported: seconds of the call (text encoding to
decoding), the peak memory (CUDA peak allocated, or the process's peak RSS on CPU), the UNet sample-forwards and VAE
encoder passes counted by hooks, and the authors' code's cost model (REFERENCE-VSP.md section 11) for the same call:
``S * 2 (1 + N)`` sample-forwards, one VAE encode per step in the real-image flow, and explicit attention in every
layer, whose largest probability map (scores and softmax output alive together) is computed here from the UNet's
shapes. This pipeline materialises no attention map (fused kernels). ``--explicit_attention`` measures that cost too:
it sets diffusers' explicit `AttnProcessor` on every layer the pipeline does not control, as the authors' code does (on
CPU the peak RSS cannot be reset, so that second peak includes the first call's).
"""

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cross_image_attention.attention_processors import list_attention_layers
from cross_image_attention.pipeline_style_prompting import StylePromptingPipeline
from cross_image_attention.pipeline_style_prompting_xl import StylePromptingXLPipeline

DATA = Path(__file__).resolve().parents[1] / "tests" / "data"


def load_sibling(name: str):
    """A module of this folder, which is not a package."""
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The byte-level tokenizer, dtypes and the measurement, shared with the appearance-transfer benchmark.
shared = load_sibling("benchmark")
TOKENIZER, DTYPES = shared.TOKENIZER, shared.DTYPES
TEXT_TOKENS = 77
TINY_SIZE = 128  # the tiny SDXL's native size; 16x16 latents

SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
    "set_alpha_to_one": False,
}
SDXL = {
    "unet": {
        "sample_size": 128,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
    "vae": {
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "sample_size": 1024,
        "scaling_factor": 0.13025,
        "force_upcast": True,
    },
    "text_encoder": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
    },
    "text_encoder_2": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "hidden_act": "gelu",
        "projection_dim": 1280,
    },
}
SD15 = {
    "unet": {
        "sample_size": 64,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
    },
    "vae": {**SDXL["vae"], "sample_size": 512, "scaling_factor": 0.18215, "force_upcast": False},
    "text_encoder": SDXL["text_encoder"],
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", choices=("sdxl", "sd"), default="sdxl")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny models (CPU-sized)")
    parser.add_argument("--images", type=int, default=4, help="generated images next to the reference")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--size", type=int, help="pixels (default: the model's native size; 128 with --tiny)")
    parser.add_argument("--reference_image", action="store_true", help="the real-image flow")
    parser.add_argument("--explicit_attention", action="store_true", help="also measure the reference's attention")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmark_style_prompting.json"), help="JSON results")
    return parser.parse_args(argv)


def text_encoders(configs: dict, tiny: bool) -> dict:
    """The text encoders (and tokenizers) of a config set; tiny ones load their configs from the tests' data."""
    components = {}
    for name, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        if name not in configs:
            continue
        if tiny:
            config = CLIPTextConfig.from_pretrained(configs[name])
        else:
            config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=TEXT_TOKENS, **configs[name])
        components[name] = model_class(config)
        tokenizer_dir = (
            TOKENIZER if not tiny else Path(configs[name]).parent / name.replace("text_encoder", "tokenizer")
        )
        components[name.replace("text_encoder", "tokenizer")] = CLIPTokenizer.from_pretrained(tokenizer_dir)
    return components


def build_pipeline(args):
    """The pipeline with random weights, built on the device in float32, then cast."""
    sdxl = args.pipeline == "sdxl"
    if args.tiny:
        root = DATA / ("tiny_sdxl" if sdxl else "tiny_sd")
        configs = {
            "unet": UNet2DConditionModel.load_config(root / "unet"),
            "vae": AutoencoderKL.load_config(root / "vae"),
        }
        configs.update({name: root / name for name in ("text_encoder", "text_encoder_2") if (root / name).is_dir()})
    else:
        configs = SDXL if sdxl else SD15
    torch.manual_seed(0)
    with torch.device(args.device):
        components = {
            "unet": UNet2DConditionModel.from_config(configs["unet"]),
            "vae": AutoencoderKL.from_config(configs["vae"]),
            **text_encoders(configs, args.tiny),
        }
    scheduler = EulerDiscreteScheduler.from_config(
        SCHEDULER
    )  # the DDIM keys stay as hidden entries, as in SDXL's file
    if sdxl:
        pipe = StylePromptingXLPipeline(**components, scheduler=scheduler)
    else:
        pipe = StylePromptingPipeline(
            **components,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    if DTYPES[args.dtype] != torch.float32:  # casting warns about fp32-only modules even when there are none
        pipe = pipe.to(dtype=DTYPES[args.dtype])
    return pipe.to(args.device)


def reference_attention_bytes(pipe, height: int, width: int, rows: int, dtype: torch.dtype) -> int:
    """The largest explicit attention map of the authors' code in one UNet call of ``rows`` samples: scores and
    softmax output ``[rows * heads, queries, keys]`` alive together."""
    latent_height, latent_width = height // pipe.vae_scale_factor, width // pipe.vae_scale_factor
    largest = 0
    for layer in list_attention_layers(pipe.unet):
        heads = pipe.unet.get_submodule(layer.name.removesuffix(".processor")).heads
        queries = layer.query_tokens(latent_height, latent_width)
        keys = queries if layer.is_self_attention else TEXT_TOKENS
        largest = max(largest, 2 * rows * heads * queries * keys * torch.finfo(dtype).bits // 8)
    return largest


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    pipe = build_pipeline(args)
    size = args.size or (TINY_SIZE if args.tiny else pipe.default_size)
    unet_rows, vae_encodes = [], []
    pipe.unet.register_forward_pre_hook(
        lambda module, a, kw: unet_rows.append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True
    )
    pipe.vae.encoder.register_forward_pre_hook(lambda module, a: vae_encodes.append(1))
    reference_image = None
    if args.reference_image:  # a colour gradient: any image costs the same
        ramp = np.linspace(0.0, 1.0, size)
        channels = [np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(1 - ramp, (size, 1))]
        reference_image = PIL.Image.fromarray((np.stack(channels, -1) * 255).astype(np.uint8))

    def call():
        return pipe(
            prompt="A dragon, low-poly game art",
            reference_prompt="A cat, low-poly game art",
            reference_image=reference_image,
            num_images_per_prompt=args.images,
            num_inference_steps=args.num_inference_steps,
            height=size,
            width=size,
            generator=torch.Generator().manual_seed(0),
            reference_generator=torch.Generator().manual_seed(42),
        )

    output, seconds, peak, unet_forwards = shared.measure(call, device, unet_rows)
    rows = 2 * (1 + args.images)
    results = {
        "pipeline": args.pipeline,
        "seconds": round(seconds, 3),
        "peak_memory_gib": round(peak, 3),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "unet_sample_forwards": unet_forwards,
        "reference_unet_sample_forwards": args.num_inference_steps * rows,
        "vae_encodes": len(vae_encodes),
        "reference_vae_encodes": args.num_inference_steps if args.reference_image else 0,
        "attention_map_mib": 0.0,
        "reference_attention_map_mib": round(
            reference_attention_bytes(pipe, size, size, rows, pipe.unet.dtype) / 2**20, 3
        ),
        "images": len(output.images),
        "finite": all(np.isfinite(np.asarray(image, dtype=np.float32)).all() for image in output.images),
    }
    if args.explicit_attention:
        pipe.unet.set_attn_processor(AttnProcessor())
        _, explicit_seconds, explicit_peak, _ = shared.measure(call, device, unet_rows)
        results.update(
            explicit_attention_seconds=round(explicit_seconds, 3),
            explicit_attention_peak_memory_gib=round(explicit_peak, 3),
        )
    results["settings"] = {**vars(args), "output": str(args.output), "size": size}
    results["machine"] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{'':<28}{'this pipeline':>16}{'reference':>12}")
    for label, ours, reference in (
        ("UNet sample-forwards", "unet_sample_forwards", "reference_unet_sample_forwards"),
        ("VAE encodes", "vae_encodes", "reference_vae_encodes"),
        ("largest attention map (MiB)", "attention_map_mib", "reference_attention_map_mib"),
    ):
        print(f"{label:<28}{results[ours]:>16}{results[reference]:>12}")
    print(f"time {seconds:.2f} s, peak memory {peak:.2f} GiB ({results['peak_memory_kind']}); JSON: {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
