import os
import textwrap

import numpy as np
import pytest
import torch

from sccsdxl import quant
from sccsdxl.errors import ParameterError
from sccsdxl.pipeline import build_random_pipeline, make_runner

from conftest import tiny_unet_call, tiny_unet_swaps

PROMPTS = ["a red bus", "a bowl of fruit"]


@pytest.fixture(scope="module")
def reference_images(tiny_runner):
    return tiny_runner.generate(PROMPTS)


def test_option_strings_round_trip():
    opts = quant.parse_optimizations("fuse_qkv, compile ,fp8,sdpa=flash")
    assert opts.fuse_qkv and opts.compile and opts.fp8 and opts.sdpa == "flash" and opts.quantization == "fp8"
    assert quant.parse_optimizations(str(opts)) == opts
    assert str(quant.parse_optimizations("")) == "none"
    assert quant.parse_config("bf16:compile,fp8").name == "bf16:compile,fp8"
    assert quant.parse_config("fp16:").name == "fp16:"
    sliced = quant.parse_optimizations("vae_slicing=10,fuse_qkv")
    assert sliced.vae_slicing == 10 and str(sliced) == "fuse_qkv,vae_slicing=10"
    assert quant.parse_optimizations(str(sliced)) == sliced
    one_image = quant.parse_optimizations("vae_slicing")
    assert one_image.vae_slicing == 1 and str(one_image) == "vae_slicing"


@pytest.mark.parametrize("text,message", [
    ("fusedqkv", "unknown optimization 'fusedqkv'"),
    ("sdpa=xformers", "unknown SDPA backend 'xformers'"),
    ("vae_slicing=0", "vae_slicing=0: the images per decoder call must be a whole number from 1"),
    ("vae_slicing=ten", "vae_slicing=ten: the images per decoder call"),
])
def test_unknown_options_list_the_known_ones(text, message):
    with pytest.raises(ParameterError, match=message) as err:
        quant.parse_optimizations(text)
    assert "fuse_qkv" in err.value.fix or "flash" in err.value.fix or "vae_slicing=N" in err.value.fix


def test_configuration_needs_a_dtype():
    with pytest.raises(ParameterError, match="does not start with a dtype"):
        quant.parse_config("compile,fp8")


@pytest.mark.parametrize("text,dtype,message", [
    ("fp8", "bf16", "fp8 needs a GPU with fp8 matmuls"),
    ("fp8", "fp16", "needs bf16 weights"),
    ("int8", "bf16", "only fast when compiled"),
    ("cuda_graphs", "bf16", "apply to compiled regions"),
    ("compile_transformers", "bf16", "apply to compiled regions"),
    ("autotune", "bf16", "autotune changes compiled kernels: add compile"),
    ("multi_kernel", "bf16", "multi_kernel changes compiled kernels: add compile"),
    ("quant_all_linears", "bf16", "widens fp8 or int8 quantization"),
    ("fused_geglu", "bf16", "fused_geglu runs the feed-forward's down projection in fp8: add fp8"),
    ("fp8_attn_out", "bf16", "fp8_attn_out runs the attention's output projection in fp8: add fp8"),
    ("fused_norms", "bf16", "fused_norms runs every transformer-block linear after a LayerNorm in fp8: add fp8"),
    ("fused_norms", "bf16", "fused_norms quantizes the fused q/k/v projection's input: add fuse_qkv"),
    ("fused_ffn_gemm", "bf16", "fused_ffn_gemm runs the feed-forward's projections in fp8: add fp8"),
    ("fp8,fused_ffn_gemm,fused_geglu", "bf16", "fused_ffn_gemm takes the place of fused_geglu"),
    ("fp8,fused_ffn_gemm", "bf16", "blockwise fp8 GEMM .* Hopper GPUs only"),
    ("nhwc_transformer_outputs", "bf16", "nhwc_transformer_outputs keeps .* add channels_last"),
    ("fp8_convs", "bf16", "fp8_convs has the fused GroupNorm kernels write its fp8 input: add fused_group_norms"),
    ("channels_last,fused_group_norms,fp8,fp8_convs", "bf16", "fp8_convs is a Triton kernel .*compute capability 9.0"),
    ("fp8,fp8_upsamplers", "bf16", "fp8_upsamplers runs the folded upsamplers' four phases in fp8: add "
                                   "folded_upsamplers"),
    ("fp8,transposed_upsamplers,fp8_upsamplers", "bf16", "fp8_upsamplers is a Triton kernel .*compute capability"),
    ("vae_fp8_convs", "bf16", "vae_fp8_convs has the decoder's fused GroupNorm kernels write its fp8 input: add "
                              "vae_group_norms"),
    ("vae_group_norms,vae_fp8_convs", "fp16", "vae_fp8_convs writes the convolutions' outputs in bf16: use the bf16"),
    ("vae_group_norms,vae_fp8_convs", "bf16", "vae_fp8_convs is a Triton kernel .*compute capability 9.0"),
    ("vae_fp8_upsamplers", "bf16", "vae_fp8_upsamplers runs the decoder's folded upsamplers' four phases in fp8: "
                                   "add folded_upsamplers"),
    ("transposed_upsamplers,vae_fp8_upsamplers", "fp16", "vae_fp8_upsamplers writes the upsamplers' outputs in "
                                                         "bf16: use the bf16 dtype"),
    ("transposed_upsamplers,vae_fp8_upsamplers", "bf16", "vae_fp8_upsamplers is a Triton kernel .*compute capability"),
    ("fp8,int8", "bf16", "exclude each other"),
    ("sdpa=flash", "fp32", "needs a GPU"),
])
def test_impossible_combinations_are_refused_with_what_works(text, dtype, message):
    with pytest.raises(ParameterError, match=message) as err:
        quant.check_optimizations(quant.parse_optimizations(text), dtype, "cpu")
    assert "fuse_qkv" in err.value.fix and "fp8" not in err.value.fix  # lists what works on the CPU


def test_every_cpu_option_builds_and_keeps_the_images(tiny_runner, reference_images):
    """One build with every option the CPU supports (compile is tested on its own below)."""
    options = "fuse_qkv,channels_last,vae_no_upcast,vae_slicing,sdpa=math"
    runner = make_runner("tiny", "fp32", "cpu", optimizations=options, latent=tiny_runner.latent)
    assert runner.info["optimizations"] == options
    result = quant.compare_images(options, reference_images, runner.generate(PROMPTS))
    assert result.mean_psnr_db > 60 and not result.broken


def test_vae_slicing_decodes_a_few_images_per_decoder_call_and_the_same_images():
    """vae_slicing=N hands the decoder N latents at a time (the last slice what is left) and returns what one call
    decodes; vae_slicing alone, one at a time, as diffusers' slicing did."""
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    latents = torch.randn(5, 4, 8, 8)
    with torch.no_grad():
        whole = pipe.vae.decode(latents, return_dict=False)[0]
    for images, calls in ((2, [2, 2, 1]), (1, [1] * 5)):
        pipe = build_random_pipeline("tiny", "fp32", "cpu")
        quant.apply_optimizations(pipe, quant.parse_optimizations("vae_slicing" if images == 1 else
                                                                  f"vae_slicing={images}"))
        seen = []
        pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
        with torch.no_grad():
            sliced = pipe.vae.decode(latents).sample
        assert seen == calls and torch.allclose(sliced, whole, atol=1e-5)


def test_regional_compilation_builds_on_the_cpu(tiny_runner, reference_images, tmp_path):
    runner = make_runner("tiny", "fp32", "cpu", optimizations="compile", latent=tiny_runner.latent,
                         cache_dir=str(tmp_path))
    assert runner.info["compiled_regions"] > 0 and runner.info["inductor_cache"].startswith(str(tmp_path))
    result = quant.compare_images("compile", reference_images, runner.generate(PROMPTS))
    assert result.mean_psnr_db > 40 and not result.broken


def test_whole_transformers_vae_regions_and_channels_last_build_on_the_cpu(tiny_runner, reference_images, tmp_path):
    """Larger compiled regions for the UNet, regional compilation of the VAE decoder, NHWC UNet with an NCHW VAE."""
    import torch

    options = "channels_last,compile,compile_transformers,compile_vae"
    runner = make_runner("tiny", "fp32", "cpu", optimizations=options, latent=tiny_runner.latent,
                         cache_dir=str(tmp_path))
    unet, vae = runner.pipe.unet, runner.pipe.vae
    transformers = [m for m in unet.modules() if type(m).__name__ == "Transformer2DModel"]
    decoder_regions = [m for m in vae.decoder.modules() if type(m).__name__ in ("ResnetBlock2D", "Upsample2D")]
    assert runner.info["compiled_regions"] == len(transformers) > 0
    assert runner.info["compiled_vae_regions"] == len(decoder_regions) > 0
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    vae.decoder.conv_in.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    result = quant.compare_images(options, reference_images, runner.generate(PROMPTS))
    assert result.mean_psnr_db > 40 and not result.broken
    assert seen == [True]  # the UNet's NHWC latents reach the decoder as NCHW


def _layouts_seen(unet) -> dict[str, list[bool]]:
    """Hooks on the UNet's transformers, ResNet blocks and samplers that note, per class, whether each input and
    output of a call was channels_last."""
    seen: dict[str, list[bool]] = {}

    def note(module, args, output):
        out = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        seen.setdefault(type(module).__name__, []).extend(
            x.is_contiguous(memory_format=torch.channels_last) for x in (args[0], out))
    for module in unet.modules():
        if type(module).__name__ in ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"):
            module.register_forward_hook(note)
    return seen


def test_nhwc_transformer_outputs_keeps_the_unet_channels_last_throughout():
    """diffusers' Transformer2DModel hands on NCHW memory, so with channels_last alone the ResNet blocks and
    samplers after it run on NCHW inputs; with the option every input and output is channels_last, the same
    values up to rounding."""
    outputs, layouts = {}, {}
    for options in ("channels_last", "channels_last,nhwc_transformer_outputs"):
        pipe = build_random_pipeline("tiny", "fp32", "cpu")
        info = quant.apply_optimizations(pipe, quant.parse_optimizations(options))
        layouts[options] = _layouts_seen(pipe.unet)
        outputs[options] = tiny_unet_call(pipe.unet, dtype=torch.float32)()
    transformers = sum(type(m).__name__ == "Transformer2DModel" for m in pipe.unet.modules())
    assert info["nhwc_transformer_outputs"] == transformers > 0
    assert not all(all(seen) for seen in layouts["channels_last"].values())
    assert all(all(seen) for seen in layouts[options].values()), layouts[options]
    assert torch.allclose(outputs[options], outputs["channels_last"], atol=1e-5)  # convolutions sum in another order


def test_the_transformers_channels_last_output_holds_when_compiled():
    """compile_transformers compiles each Transformer2DModel with its hooks: the compiled one hands on
    channels_last too (here the CPU path)."""
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    quant.apply_optimizations(pipe, quant.parse_optimizations("channels_last,nhwc_transformer_outputs"))
    transformer = next(m for m in pipe.unet.modules() if type(m).__name__ == "Transformer2DModel")
    width = transformer.config.in_channels
    x = torch.randn(2, width, 8, 8).contiguous(memory_format=torch.channels_last)
    text = torch.randn(2, 77, transformer.config.cross_attention_dim)
    with torch.no_grad():
        expected = transformer(x, encoder_hidden_states=text, return_dict=False)[0]
        transformer.compile(backend="aot_eager", fullgraph=True)
        out = transformer(x, encoder_hidden_states=text, return_dict=False)[0]
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("options,tuned", [("compile,compile_vae", False), ("compile,compile_vae,autotune", True)])
def test_coordinate_descent_tuning_is_the_configurations_choice_for_the_unet_only(options, tuned, tiny_runner,
                                                                                   monkeypatch):
    """torchao's quantize_ switches the tuning on for the whole process; a compiled configuration decides it itself,
    for the UNet's regions, and the VAE's are compiled without it."""
    import torch
    import torch._inductor.config as inductor

    compiled = []
    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((self, kw)) or real(self, **kw))
    with quant.own_inductor_settings():
        inductor.coordinate_descent_tuning = True  # what an earlier quantization left behind
        runner = make_runner("tiny", "fp32", "cpu", optimizations=options, latent=tiny_runner.latent)
        assert inductor.coordinate_descent_tuning is False and runner.info["coordinate_descent_tuning"] is tuned
    unet = set(runner.pipe.unet.modules())
    in_unet = [(kw.get("options") or {}).get("coordinate_descent_tuning", False) for m, kw in compiled if m in unet]
    in_vae = [(kw.get("options") or {}).get("coordinate_descent_tuning", False) for m, kw in compiled if m not in unet]
    assert len(in_unet) == runner.info["compiled_regions"] and len(in_vae) == runner.info["compiled_vae_regions"] > 0
    assert set(in_unet) == {tuned} and set(in_vae) == {False}
    assert inductor.coordinate_descent_tuning is False


@pytest.mark.parametrize("options,multi", [("compile", 0), ("compile,multi_kernel", 1)])
def test_multi_kernel_is_the_configurations_choice(options, multi, tiny_runner):
    """Persistent-reduction variants are built only for the configuration that names multi_kernel."""
    import torch._inductor.config as inductor

    with quant.own_inductor_settings():
        inductor.triton.multi_kernel = 1 - multi  # what an earlier configuration left behind
        saved = os.environ.pop(NO_PICK_CACHE, None)
        try:
            runner = make_runner("tiny", "fp32", "cpu", optimizations=options, latent=tiny_runner.latent)
            # the warm-start fix: without it a new process cannot load a cached graph holding a multi-kernel
            assert (os.environ.get(NO_PICK_CACHE) == "1") is bool(multi)
        finally:
            os.environ.pop(NO_PICK_CACHE, None)
            if saved is not None:
                os.environ[NO_PICK_CACHE] = saved
        assert inductor.triton.multi_kernel == multi and runner.info["multi_kernel"] is bool(multi)
    assert inductor.triton.multi_kernel == 0


def test_cuda_graphs_take_one_unet_forward_as_one_step(monkeypatch):
    """With compiled regions, the graph trees must not start a new step at each region (see the GPU test below)."""
    steps = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    monkeypatch.setattr(quant, "compile_regions", lambda *args: 0)  # the hook is what is tested here, not inductor
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    quant.apply_optimizations(pipe, quant.parse_optimizations("compile,compile_resnets,cuda_graphs"))
    call = tiny_unet_call(pipe.unet, "cpu", torch.float32)
    call()
    call()
    assert len(steps) == 2


def test_a_cuda_graph_runner_generates_on_one_thread_whoever_calls(tiny_runner, monkeypatch):
    """Graph trees are per thread; warm-up, loadgen's worker and the guard each call from a thread of their own."""
    import dataclasses
    import threading
    from concurrent.futures import ThreadPoolExecutor

    threads = []
    runner = dataclasses.replace(tiny_runner, one_thread=True)
    monkeypatch.setattr(runner, "_generate", lambda prompts: threads.append(threading.get_ident()) or prompts)
    with ThreadPoolExecutor(max_workers=2) as pool:
        assert list(pool.map(runner.generate, [["a"], ["b"], ["c"]])) == [["a"], ["b"], ["c"]]
    assert runner.generate(["d"]) == ["d"]
    assert len(threads) == 4 and len(set(threads)) == 1 and threads[0] != threading.get_ident()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the H200)")
def test_cuda_graphs_over_compiled_regions_replay_and_agree_with_eager(tmp_path):
    """On the H200 the full UNet with cuda_graphs failed at its second region call before the step hook."""
    pipe = build_random_pipeline("tiny", "bf16", "cuda")
    call = tiny_unet_call(pipe.unet, "cuda", torch.bfloat16)
    eager = call()
    quant.apply_optimizations(pipe, quant.parse_optimizations("channels_last,compile,compile_resnets,"
                                                              "compile_transformers,cuda_graphs"), tmp_path)
    outputs = [call() for _ in range(4)]  # warm-up, recording, then replays
    for out in outputs:
        assert float((out.float() - eager.float()).norm() / eager.float().norm()) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the H200)")
def test_a_loadgen_run_replays_the_cuda_graphs_recorded_before_it(tmp_path, monkeypatch):
    """loadgen calls from a worker thread of its own; a runner on the caller's thread would record every graph
    again there, inside the timed run."""
    import threading

    from sccsdxl.harness import RunConfig, run_benchmark

    captured = []
    real = torch.cuda.CUDAGraph.capture_begin
    monkeypatch.setattr(torch.cuda.CUDAGraph, "capture_begin",
                        lambda self, *args, **kw: captured.append(threading.get_ident()) or real(self, *args, **kw))
    config = RunConfig(variant="base", model_source="tiny", dtype="bf16", device="cuda", batch_size=10,
                       output_dir=str(tmp_path), warmup_batches=0, optimizations="compile,compile_resnets,cuda_graphs")
    runner = make_runner("tiny", "bf16", "cuda", cache_dir=str(tmp_path / "cache"), optimizations=config.optimizations)
    for _ in range(3):  # the graph trees' warm-up, recording, replay
        runner.generate(["a photo of a cat"] * config.batch_size)
    recorded = len(captured)
    run = run_benchmark(config, modes=("performance",), generator=runner, show_progress=False)
    assert recorded > 0, "the graph trees recorded nothing before the run"
    assert len(captured) == recorded, f"{len(captured) - recorded} graphs recorded again during the timed run"
    assert run.result("performance")["samples_per_second"] > 0


NO_PICK_CACHE = "TORCHINDUCTOR_DISABLE_MULTI_KERNEL_CACHE"

MULTI_KERNEL_WARM_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import torch.nn.functional as F
    from torch._dynamo.utils import counters
    from sccsdxl import quant

    quant.configure_inductor(quant.parse_optimizations("compile,multi_kernel"), sys.argv[1])
    torch.manual_seed(0)
    x = torch.randn(8, 1024, 1280, device="cuda", dtype=torch.bfloat16)  # LayerNorm rows as in the UNet's blocks
    fn = torch.compile(lambda t: F.layer_norm(t, (1280,)).abs().amax(dim=-1, keepdim=True) * t, fullgraph=True)
    with torch.no_grad():
        out = fn(x)
    hits = counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"]
    print(json.dumps({"sum": float(out.float().sum()), "cache_hits": hits}))
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor builds multi-kernels for GPUs (run on the H200)")
def test_a_compiled_multi_kernel_starts_warm_from_the_disk_cache_in_a_new_process(cache_in_two_processes, tmp_path):
    """04's warm start with multi_kernel: on torch 2.11 the second process failed while loading the cached graph."""
    runs = cache_in_two_processes(MULTI_KERNEL_WARM_SCRIPT, unset=(NO_PICK_CACHE,))
    cached_code = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.py"))
    assert "async_compile.multi_kernel(" in cached_code  # the graph really holds a multi-kernel
    assert runs[1]["cache_hits"] > 0
    assert runs[1]["sum"] == pytest.approx(runs[0]["sum"], rel=1e-3)


def test_guard_fails_a_broken_configuration(reference_images):
    black = np.zeros_like(reference_images)
    result = quant.compare_images("broken", reference_images, black)
    assert result.verdict == "fail" and result.broken == [0, 1]
    assert "black or flat" in result.reasons[0]


def test_guard_uses_the_clip_tolerance(reference_images):
    drifted = quant.compare_images("drift", reference_images, reference_images,
                                   clip_scores=lambda imgs, s=iter([31.7, 30.0]): next(s))
    assert drifted.verdict == "fail" and drifted.clip_delta == pytest.approx(1.7 / 31.7)
    same = quant.compare_images("same", reference_images, reference_images,
                                clip_scores=lambda imgs: 31.7)
    assert same.verdict == "pass" and same.clip_delta == 0
    unverified = quant.compare_images("pixels", reference_images, reference_images)
    assert unverified.verdict == "unverified"


def test_psnr_of_known_difference():
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # mse = 255^2 / 48
    assert quant.psnr(a, b) == pytest.approx(10 * np.log10(48))
    assert quant.psnr(a, a) == float("inf")


def test_choice_and_parameter_file(tmp_path):
    from sccsdxl.harness import RunConfig

    rows = [{"config": "fp16:", "reference": "fp16:", "dtype": "fp16", "optimizations": "none", "status": "ok", "verdict": "pass",
             "samples_per_second": 1.2},
            {"config": "bf16:compile,fp8", "dtype": "bf16", "optimizations": "compile,fp8", "status": "ok",
             "verdict": "fail", "samples_per_second": 2.0},
            {"config": "bf16:compile", "dtype": "bf16", "optimizations": "compile", "status": "ok",
             "verdict": "pass", "samples_per_second": 1.5},
            {"config": "bf16:fuse_qkv", "dtype": "bf16", "optimizations": "fuse_qkv", "status": "out of memory",
             "verdict": "fail"}]
    chosen = quant.choose(rows)
    assert chosen["config"] == "bf16:compile"  # the faster fp8 row failed the guard
    base = RunConfig(variant="main", model_source="hf", batch_size=8)
    first = quant.write_tuned_params(tmp_path, base, chosen)
    second = quant.write_tuned_params(tmp_path, base, rows[0])
    import yaml

    assert yaml.safe_load(second.read_text())["dtype"] == "fp16"
    kept = [p for p in tmp_path.glob("quantized-*.yaml")]
    assert first == second and len(kept) == 1 and yaml.safe_load(kept[0].read_text())["optimizations"] == "compile"
    table = quant.results_table(rows)
    assert table.loc["bf16:compile", "speedup"] == pytest.approx(1.25)
    quant.plot_results(rows)


def test_options_table_marks_what_the_machine_lacks():
    table = quant.options_table("cpu")
    assert table.loc["fp8", "here"] == "no" and table.loc["fuse_qkv", "here"] == "yes"


def test_options_picker_adds_a_checked_configuration():
    from sccsdxl.widgets import options_picker

    configs = ["fp16:"]
    panel = options_picker(configs)
    panel.add()
    assert configs[-1] == "bf16:"


def test_padded_batches_return_only_the_asked_images(tiny_runner):
    alone = tiny_runner.generate(["a red bus"])
    tiny_runner.pad_to = 3
    try:
        padded = tiny_runner.generate(["a red bus"])
    finally:
        tiny_runner.pad_to = 0
    assert padded.shape == alone.shape and np.abs(padded.astype(int) - alone).max() <= 1


def test_readme_describes_every_option():
    """README's speed-options table has a row for each option the kit accepts (and none it does not)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Speed options")[1].split("\n### ")[0]
    rows = {cell for line in section.splitlines() if line.startswith("| `")
            for cell in line.split("|")[1].replace("`", "").split(",")}
    assert {name.strip() for name in rows} == set(quant.OPTIONS) | {"sdpa=<backend>"}


def test_first_call_command_says_what_is_wrong_without_a_traceback(tmp_path, capsys):
    """What a batch job runs to fill the compile cache (README): bad options end in the kit's message, exit 2."""
    code = quant._first_call_main(["--first-call", "bf16:fp8,fused_ffn_gemm", "--model-source", "tiny", "--device",
                                   "cpu", "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ParameterError: optimization options that cannot work here")
    assert "fused_ffn_gemm needs" in err and "fix: options available on this machine" in err
    assert "Traceback" not in err


def test_warm_start_reuses_the_compile_cache(tmp_path):
    """A second process with the same output_dir finds the compiled kernels on disk."""
    from sccsdxl.harness import RunConfig

    base = RunConfig(variant="base", model_source="tiny", device="cpu", output_dir=str(tmp_path))
    cold = quant.warm_start_seconds(base, "fp32:compile", 2)
    warm = quant.warm_start_seconds(base, "fp32:compile", 2)
    assert cold["config"] == warm["config"] == "fp32:compile"
    assert any((tmp_path / "cache" / "inductor").iterdir())
    assert warm["first_call_seconds"] < cold["first_call_seconds"]


def test_exact_partial_batches_are_served_unpadded(tiny_runner, monkeypatch):
    seen = []
    monkeypatch.setattr(tiny_runner, "_generate", lambda prompts: seen.append(len(prompts)) or
                        np.zeros((len(prompts), 1, 1, 3), np.uint8))
    monkeypatch.setattr(tiny_runner, "pad_to", 4)
    monkeypatch.setattr(tiny_runner, "exact_sizes", {2})
    assert len(tiny_runner.generate(["a"] * 2)) == 2 and len(tiny_runner.generate(["b"])) == 1
    assert seen == [2, 4]  # the warmed partial size as is; any other short batch padded to the full size


def test_quantization_takes_only_the_wide_linears_of_the_transformer_blocks():
    import torch

    block = "down_blocks.2.attentions.0.transformer_blocks.0."
    layers = {block + "ff.net.0.proj": (1280, 10240), block + "attn1.to_qkv": (1280, 3840),
              block + "attn1.to_q": (1280, 1280), block + "ff.net.2": (5120, 1280), block + "attn2.to_k": (2048, 1280),
              "down_blocks.2.attentions.0.proj_in": (1280, 1280), "add_embedding.linear_1": (2816, 1280),
              "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj": (640, 5120)}
    chosen = {name for name, (k, n) in layers.items()
              if quant._quantizable(torch.nn.Linear(k, n, device="meta"), name)}
    assert chosen == {block + "ff.net.0.proj", block + "attn1.to_qkv",
                      "up_blocks.1.attentions.0.transformer_blocks.1.ff.net.0.proj"}
    assert not quant._quantizable(torch.nn.Conv2d(1280, 5120, 1, device="meta"), block + "conv")
    everything = {name for name, (k, n) in layers.items() if quant._in_blocks(torch.nn.Linear(k, n, device="meta"), name)}
    assert everything == {name for name in layers if "transformer_blocks" in name}  # quant_all_linears


def test_the_fused_swaps_build_on_each_other_in_apply_optimizations():
    """fused_geglu and fp8_attn_out swap modules that fused_norms then takes over (fp8 itself, a GPU option, is
    left out here: the swaps are what is tested)."""
    from sccsdxl import fused

    pipe, blocks, call, before, info = tiny_unet_swaps("fuse_qkv,fused_geglu,fp8_attn_out,fused_norms")
    assert info["fused_feed_forwards"] == info["fused_blocks"] == blocks > 0
    assert info["fp8_attention_outputs"] == 2 * blocks
    fused_blocks = [m for m in pipe.unet.modules() if isinstance(m, fused.Fp8TransformerBlock)]
    assert len(fused_blocks) == blocks and all(isinstance(b.down, fused.Fp8RowWeight) for b in fused_blocks)
    after = call()
    assert float((after.float() - before.float()).norm() / before.float().norm()) < 0.05


def test_fp8_convs_takes_the_fused_resnet_blocks_and_compile_takes_it():
    """fp8_convs swaps the ResNet blocks fused_group_norms made (fp8, a GPU option, is left out: the swap and the
    CPU reference path are what is tested); compile_resnets then compiles them by class name."""
    from sccsdxl import fp8_conv

    pipe, _, call, before, info = tiny_unet_swaps("channels_last,fused_group_norms,fp8_convs")
    swapped = [m for m in pipe.unet.modules() if isinstance(m, fp8_conv.Fp8ConvResnetBlock)]
    assert info["fp8_convs"] == len(swapped) == info["fused_group_norms"]["resnets"] > 0
    after = call()
    assert float((after.float() - before.float()).norm() / before.float().norm()) < 0.08
    with quant.own_inductor_settings():
        regions = quant.compile_regions(pipe.unet, resnets=True, cuda_graphs=False)
    assert sum(isinstance(m, fp8_conv.Fp8ConvResnetBlock) and hasattr(m, "_compiled_call_impl")
               for m in pipe.unet.modules()) == len(swapped) and regions >= len(swapped)


def test_fp8_upsamplers_takes_the_unets_folded_upsamplers_and_compile_takes_it():
    """fp8_upsamplers swaps the UNet's upsamplers that transposed_upsamplers folded (not the VAE decoder's); on the CPU
    through the reference path the UNet's output stays within e4m3's error, and compile_resnets compiles them."""
    from sccsdxl import fp8_conv

    pipe, _, call, before, info = tiny_unet_swaps("transposed_upsamplers,fp8_upsamplers")
    swapped = [m for m in pipe.unet.modules() if isinstance(m, fp8_conv.Fp8Upsample)]
    assert info["fp8_upsamplers"] == len(swapped) > 0
    assert not any(isinstance(m, fp8_conv.Fp8Upsample) for m in pipe.vae.modules())
    after = call()
    assert float((after.float() - before.float()).norm() / before.float().norm()) < 0.08
    with quant.own_inductor_settings():
        quant.compile_regions(pipe.unet, resnets=True, cuda_graphs=False)
    assert all(hasattr(m, "_compiled_call_impl") for m in swapped)


def tiny_decoder_swaps(options: str, kind: type) -> tuple:
    """The tiny bf16 pipeline with ``options`` applied: the pipeline, its decoder's modules of ``kind``, the options'
    record, and how far its decoded images moved (relative)."""
    from conftest import tiny_vae_decode

    from sccsdxl.pipeline import build_random_pipeline

    pipe = build_random_pipeline("tiny", "bf16", "cpu")
    decode = tiny_vae_decode(pipe, dtype=torch.bfloat16)
    with torch.no_grad():
        before = decode()
        info = quant.apply_optimizations(pipe, quant.parse_optimizations(options))
        after = decode()
    swapped = [m for m in pipe.vae.decoder.modules() if isinstance(m, kind)]
    return pipe, swapped, info, float((after.float() - before.float()).norm() / before.float().norm())


def test_vae_fp8_convs_takes_the_decoders_fused_resnet_blocks_and_compile_vae_takes_it():
    """vae_fp8_convs swaps the decoder's ResNet blocks that vae_group_norms made and whose convolutions the kernel
    can run (the tiny decoder's 32-channel blocks, not its 16-channel ones), on the CPU through the reference path;
    the decoded images stay within e4m3's error, and compile_vae compiles the blocks by class name."""
    from sccsdxl import fp8_conv

    pipe, swapped, info, moved = tiny_decoder_swaps("vae_group_norms,vae_fp8_convs", fp8_conv.Fp8ConvResnetBlock)
    assert info["vae_fp8_convs"] == len(swapped) > 0
    assert len(swapped) < info["vae_group_norms"]["resnets"]  # the 16-channel blocks stay bf16
    assert all(block.fp8_conv1.weight.dtype == torch.float8_e4m3fn for block in swapped)
    # e4m3's rounding (about 4 % per convolution) through the swapped blocks, with random weights: 8.3 % here
    assert moved < 0.12
    with quant.own_inductor_settings():
        quant.compile_vae_regions(pipe.vae)
    assert all(hasattr(block, "_compiled_call_impl") for block in swapped)


def test_vae_fp8_upsamplers_takes_the_decoders_folded_upsamplers_and_compile_vae_takes_them():
    """vae_fp8_upsamplers swaps the decoder's upsamplers that transposed_upsamplers folded (not the UNet's), on the
    CPU through the reference path; the decoded images stay within e4m3's error, and compile_vae compiles them."""
    from sccsdxl import fp8_conv

    pipe, swapped, info, moved = tiny_decoder_swaps("transposed_upsamplers,vae_fp8_upsamplers", fp8_conv.Fp8Upsample)
    assert info["vae_fp8_upsamplers"] == len(swapped) > 0
    assert not any(isinstance(m, fp8_conv.Fp8Upsample) for m in pipe.unet.modules())
    assert all(up.weight.dtype == torch.float8_e4m3fn for up in swapped)
    assert moved < 0.08
    with quant.own_inductor_settings():
        quant.compile_vae_regions(pipe.vae)
    assert all(hasattr(up, "_compiled_call_impl") for up in swapped)


def test_regional_compilation_takes_the_fused_blocks_which_trace_as_one_graph():
    """fused_norms swaps the blocks that `compile` compiles by class name: each chain of them must be a region, and
    dynamo must trace a whole model with its chain as one graph (inductor's code generation is left to the GPU
    tests, where it takes the Triton kernels)."""
    from sccsdxl import fused

    pipe = build_random_pipeline("tiny", "bf16", "cpu")
    pipe.fuse_qkv_projections()
    unet = pipe.unet
    assert fused.fuse_transformer_blocks(unet) > 0
    transformer = next(m for m in unet.modules() if type(m).__name__ == "Transformer2DModel")
    torch.manual_seed(0)
    hidden = torch.randn(2, transformer.config.in_channels, 4, 4, dtype=torch.bfloat16)
    text = torch.randn(2, 77, transformer.config.cross_attention_dim, dtype=torch.bfloat16)
    with torch.inference_mode():  # return_dict=False, as the UNet calls it
        eager = transformer(hidden, encoder_hidden_states=text, return_dict=False)[0]
        traced = torch.compile(transformer, fullgraph=True, backend="aot_eager")(hidden, encoder_hidden_states=text,
                                                                                  return_dict=False)[0]
    assert torch.equal(traced, eager)
    chains = sum(isinstance(m, fused.Fp8TransformerChain) for m in unet.modules())
    with quant.own_inductor_settings():
        assert quant.compile_regions(unet, resnets=False, cuda_graphs=False) == chains > 0


@pytest.mark.parametrize("backend", ["cudnn", "flash", "efficient", "math"])
def test_sdpa_preference_falls_back_where_the_kernel_cannot_run(backend):
    """On the CPU only the math kernel exists: preferring another must still compute the same attention."""
    import torch
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    with quant.sdpa_context(backend):
        out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_shipped_parameter_files_name_known_configurations():
    from pathlib import Path

    import yaml

    params = Path(__file__).resolve().parent.parent / "params"
    files = [yaml.safe_load(p.read_text()) for p in sorted(params.glob("*.yaml"))]
    configs = [c for data in files for c in data.get("configs", [])]
    assert "bf16:fuse_qkv,compile,fp8,vae_no_upcast,sdpa=cudnn" in configs
    assert all(quant.parse_config(c).name for c in configs)  # unknown options would raise ParameterError


@pytest.fixture
def two_steps(monkeypatch):
    """The tiny pipeline denoises in 2 steps instead of the benchmark's 20: for the tests of evaluate_configs's
    bookkeeping, which run whole loadgen runs but never look at what the steps compute (10x less CPU time)."""
    from sccsdxl import constants

    monkeypatch.setattr(constants, "NUM_INFERENCE_STEPS", 2)


def test_inductor_options_set_while_building_a_configuration_do_not_leak(tmp_path, monkeypatch, two_steps):
    """torchao's quantize_ turns on coordinate-descent tuning process-wide; the next configuration must not inherit it."""
    import torch._inductor.config as inductor

    from sccsdxl import pipeline
    from sccsdxl.harness import RunConfig

    real = pipeline.make_runner

    def quantizing_make_runner(*args, **kwargs):
        inductor.coordinate_descent_tuning = True  # what torchao's recommended_inductor_config_setter does
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "make_runner", quantizing_make_runner)
    before = inductor.coordinate_descent_tuning
    base = RunConfig(variant="base", model_source="tiny", dtype="fp32", device="cpu", batch_size=25,
                     output_dir=str(tmp_path), warmup_batches=0)
    rows = quant.evaluate_configs(base, ["fp32:"], guard_samples=1, show_progress=False)
    assert rows[0]["status"] == "ok"
    assert inductor.coordinate_descent_tuning == before is False


def test_a_failing_configuration_is_a_row_and_a_second_evaluation_resumes(tmp_path, monkeypatch, two_steps):
    """An out-of-memory configuration is recorded as such and the others still run; finished rows are not redone."""
    import torch

    from sccsdxl import pipeline
    from sccsdxl.harness import RunConfig

    real, built = pipeline.make_runner, []

    def make_runner(*args, optimizations="", **kwargs):
        built.append(optimizations)
        if optimizations == "fuse_qkv":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80 GiB (simulated)")
        return real(*args, optimizations=optimizations, **kwargs)

    monkeypatch.setattr(pipeline, "make_runner", make_runner)
    base = RunConfig(variant="base", model_source="tiny", dtype="fp32", device="cpu", batch_size=25,
                     output_dir=str(tmp_path), warmup_batches=0)
    rows = quant.evaluate_configs(base, ["fp32:fuse_qkv", "fp32:"], guard_samples=1, show_progress=False)
    assert [r["status"] for r in rows] == ["out of memory", "ok"] and rows[0]["verdict"] == "fail"
    assert "Tried to allocate 80 GiB" in rows[0]["error"] and rows[1]["samples_per_second"] > 0
    built.clear()
    again = quant.evaluate_configs(base, ["fp32:fuse_qkv", "fp32:"], guard_samples=1, show_progress=False)
    assert again == rows and built == []  # read back from results.jsonl, the reference images from disk


def test_failure_line_skips_the_hints_after_the_exception():
    stderr = ("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
              "torch._dynamo.exc.BackendCompilerFailed: backend='inductor' raised:\n"
              "AssertionError: kernel 3 is not in the side table\n\n"
              "Set TORCHDYNAMO_VERBOSE=1 for the internal stack trace (please do this especially if you're reporting "
              "a bug to PyTorch). For even more developer context, set TORCH_LOGS=\"+dynamo\"\n")
    assert quant.failure_line(stderr) == "AssertionError: kernel 3 is not in the side table"
    assert quant.failure_line("just one line\n") == "just one line"
    assert quant.failure_line("") == "no output"


def test_a_failed_warm_start_names_the_exception_and_keeps_its_output(tmp_path):
    from sccsdxl.harness import RunConfig

    base = RunConfig(variant="base", model_source="tiny", device="cpu", output_dir=str(tmp_path / "out"))
    with pytest.raises(RuntimeError) as failed:
        quant.warm_start_seconds(base, "fp32:no_such_option", 1, log_dir=tmp_path / "logs")
    message = str(failed.value)
    assert "ParameterError" in message and "no_such_option" in message and "TORCHDYNAMO" not in message
    logs = list((tmp_path / "logs").glob("warm-start-*.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    assert "ParameterError: unknown" in logs[0].read_text()  # the kit's own message, whole, in the kept log
    with pytest.raises(RuntimeError):  # a second failure writes a second log; the first is kept
        quant.warm_start_seconds(base, "fp32:no_such_option", 1, log_dir=tmp_path / "logs")
    assert len(list((tmp_path / "logs").glob("warm-start-*.log"))) == 2


def test_a_failed_warm_start_keeps_the_configurations_measurements(tmp_path, monkeypatch, two_steps):
    """The cold run's speed and guard stand; the warm start's failure is reported beside them."""
    from sccsdxl import pipeline
    from sccsdxl.harness import RunConfig

    real = pipeline.make_runner

    def make_runner(*args, optimizations="", **kwargs):  # build uncompiled: the warm start is what is tested
        return real(*args, optimizations="", **kwargs)

    def warm_start_fails(*args, **kwargs):
        raise RuntimeError("warm-start measurement of 'fp32:compile' failed: AssertionError: simulated")

    monkeypatch.setattr(pipeline, "make_runner", make_runner)
    monkeypatch.setattr(quant, "warm_start_seconds", warm_start_fails)
    base = RunConfig(variant="base", model_source="tiny", dtype="fp32", device="cpu", batch_size=25,
                     output_dir=str(tmp_path), warmup_batches=0)
    rows = quant.evaluate_configs(base, ["fp32:compile"], guard_samples=1, show_progress=False, warm_start=True)
    assert rows[0]["status"] == "ok" and rows[0]["samples_per_second"] > 0 and rows[0]["verdict"] != "fail"
    assert "simulated" in rows[0]["warm_start_error"] and "warm_first_call_seconds" not in rows[0]
    assert "simulated" in quant.results_table(rows).loc["fp32:compile", "error"]


def test_cudnn_benchmark_is_set_by_each_configuration_built():
    """A process-wide flag: a configuration built without the option must not run with the one before's."""
    pipe = build_random_pipeline("tiny", "fp32", "cpu")
    try:
        quant.apply_optimizations(pipe, quant.parse_optimizations("cudnn_benchmark"))
        assert torch.backends.cudnn.benchmark
        quant.apply_optimizations(pipe, quant.parse_optimizations(""))
        assert not torch.backends.cudnn.benchmark
    finally:
        torch.backends.cudnn.benchmark = False
    with pytest.raises(ParameterError, match="cudnn_benchmark times cuDNN's convolution algorithms: it needs an NVIDIA"):
        quant.check_optimizations(quant.parse_optimizations("cudnn_benchmark"), "fp32", "cpu")
