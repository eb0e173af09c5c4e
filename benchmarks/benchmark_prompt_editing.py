"""Time, memory and UNet work of one default Free-Prompt-Editing edit of a real image, next to the reference's work.

    python benchmarks/benchmark_prompt_editing.py                  # SD 1.5-shaped, random weights, 512 px, defaults
    python benchmarks/benchmark_prompt_editing.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --dtype float16
    python benchmarks/benchmark_prompt_editing.py --model TINY_SD_FOLDER --device cpu --height 64 --width 64  # tiny

Without ``--model`` the components are built from SD 1.5's configs with random weights (same shapes, so the same cost;
the images are noise), as in ``benchmark.py``. The edit is the reference's real-image default: the bundled photo,
source prompt "" (``--source_prompt``), 50 steps, CFG 7.5, maps replaced during the first 80 % of the steps. Reported:
seconds of the inversion and of the edit (with the decode), peak memory (CUDA peak allocated, or the process's peak
RSS on CPU), and the UNet sample-forwards counted by a hook, next to the reference's: ``T`` calls of ``[uncond, cond]``
for the inversion and ``T`` calls of ``[u_src, u_tgt, c_src, c_tgt]`` for the edit (2 T + 4 T = 300 for T = 50).
"""

import argparse
import importlib.util
import json
import platform
import sys
from pathlib import Path

import PIL.Image
import torch

from cross_image_attention.pipeline_prompt_editing import FreePromptEditingPipeline


def load_sibling(name: str):
    """A module of this folder, which is not a package."""
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# SD 1.5's shapes and the measurement, shared with the appearance-transfer benchmark.
shared = load_sibling("benchmark")
DTYPES = shared.DTYPES


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="Hub id or local folder; default: SD 1.5 shapes with random weights")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--source_prompt", default="", help="the inversion's and source's prompt (default: \"\")")
    parser.add_argument("--prompt", default="a photo of a tiger", help="the target prompt")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, default=Path("benchmark_prompt_editing.json"), help="JSON results")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    pipe = shared.build_pipeline(args, FreePromptEditingPipeline)
    pipe.set_progress_bar_config(disable=True)
    counter = []
    pipe.unet.register_forward_pre_hook(
        lambda module, a, kw: counter.append((a[0] if a else kw["sample"]).shape[0]), with_kwargs=True
    )
    image = PIL.Image.open(shared.EXAMPLES / "chelsea.jpg").convert("RGB")
    steps, size = args.num_inference_steps, {"height": args.height, "width": args.width}

    inversion, inversion_s, inversion_peak, inversion_forwards = shared.measure(
        lambda: pipe.invert(image, prompt=args.source_prompt, num_inference_steps=steps, **size), device, counter
    )
    output, edit_s, edit_peak, edit_forwards = shared.measure(
        lambda: pipe(args.prompt, inversion=inversion, source_prompt=args.source_prompt, num_inference_steps=steps),
        device,
        counter,
    )
    reference_inversion, reference_edit = 2 * steps, 4 * steps
    results = {
        "inversion_s": round(inversion_s, 3),
        "edit_s": round(edit_s, 3),
        "total_s": round(inversion_s + edit_s, 3),
        "peak_memory_gib": round(max(inversion_peak, edit_peak), 3),
        "peak_memory_kind": "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss",
        "unet_sample_forwards": inversion_forwards + edit_forwards,
        "unet_sample_forwards_inversion": inversion_forwards,
        "unet_sample_forwards_edit": edit_forwards,
        "reference_unet_sample_forwards": reference_inversion + reference_edit,
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
        ("inversion", inversion_s, inversion_forwards, reference_inversion),
        ("edit + decode", edit_s, edit_forwards, reference_edit),
        ("total", inversion_s + edit_s, inversion_forwards + edit_forwards, reference_inversion + reference_edit),
    ]
    print(f"{'phase':<20}{'time':>12}{'UNet forwards':>16}{'reference':>12}")
    for name, seconds, forwards, reference in rows:
        print(f"{name:<20}{seconds:>10.2f} s{forwards:>16}{reference:>12}")
    print(f"peak memory: {results['peak_memory_gib']:.2f} GiB ({results['peak_memory_kind']}); JSON: {args.output}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
