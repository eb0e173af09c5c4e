"""Copy what the Visual Style Prompting tests use out of the parity fixture (../shared/parity-vsp), once.

Run from the repository root with the fixture beside it: `python tests/data/make_parity_vsp_subset.py`. Writes
`tests/data/parity_vsp/vsp_visible_short.safetensors` (the case's arrays but `latents_in_per_step`, which is
`init_latents * init_noise_sigma` followed by `latents_per_step[:-1]`, checked here; and `final_latents`, which is
`latents_per_step[-1]`) and `vsp_visible_short.json` (the call's settings and the recorded schedule). The tiny SDXL
model's weights are not copied: `tests/test_style_prompting.py` rebuilds them from the configs in `tiny_sdxl/`.
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CASE = "vsp_visible_short"
source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/parity-vsp")
target = Path(__file__).parent / "parity_vsp"
arrays = load_file(source / f"{CASE}.safetensors")
record = json.loads((source / f"{CASE}.json").read_text())

latents_in = arrays.pop("latents_in_per_step")
assert torch.equal(latents_in[0], arrays["init_latents"] * record["init_noise_sigma"])
assert torch.equal(latents_in[1:], arrays["latents_per_step"][:-1])
assert torch.equal(arrays.pop("final_latents"), arrays["latents_per_step"][-1])
target.mkdir(exist_ok=True)
save_file({k: v.contiguous() for k, v in arrays.items()}, target / f"{CASE}.safetensors", metadata={"source": CASE})

call = record["pipeline_call_kwargs"][0]
subset = {
    "source": f"shared/parity-vsp/{CASE}.json",
    "reference_prompt": call["prompt"],
    "prompt": call["target_prompt"],
    "negative_prompt": call["negative_prompt"],
    "guidance_scale": call["guidance_scale"],
    "num_inference_steps": call["num_inference_steps"],
    "reference_seed": record["config_json"]["reference_info"]["ref_seeds"][0],
    "seeds": record["config_json"]["inference_info"]["inf_seeds"],
    "init_noise_sigma": record["init_noise_sigma"],
    "swapped_layers": record["schedule"]["swapped_layer_sets"][0],
    "cfg_scale_used_by_step": [float(scales[0]) for scales in record["schedule"]["cfg_scale_used_by_step"]],
    "max_abs_final_latents": record["stats"]["max_abs_final_latents"],
}
(target / f"{CASE}.json").write_text(json.dumps(subset, indent=2) + "\n")
print(f"wrote {target}")
