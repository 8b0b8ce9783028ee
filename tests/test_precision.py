"""``--amp`` auto: bf16 on CPU only where it is native and its GEMMs measurably faster, fp16 on
CUDA; the one-line reports of
precision and LIF backend that every train/eval script prints. Both answers of the CPU
detection are exercised by monkeypatching torch's capability report."""
from types import MappingProxyType

import pytest
import torch

from qkformer import evaluate, precision, train
from qkformer.data.synthetic_images import write_png_image_folder

X86 = {"architecture": "x86_64", "avx512_f": True, "avx2": True}


@pytest.mark.parametrize("caps,native,why", [
    ({**X86, "avx512_bf16": True}, True, "AVX512_BF16"),
    ({**X86, "amx_bf16": True, "avx512_bf16": True}, True, "AMX_BF16"),
    (X86, False, "no AMX_BF16/AVX512_BF16 on x86_64"),  # AVX-512 alone: bf16 emulated
    ({"architecture": "aarch64", "bf16": True}, True, "BF16"),
    ({"architecture": "aarch64", "neon": True}, False, "no BF16/SVE_BF16 on aarch64"),
    ({"architecture": "riscv64"}, False, "no bf16 instructions on riscv64"),
])
def test_cpu_bf16_detection(monkeypatch, caps, native, why):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: MappingProxyType(caps))
    assert precision.cpu_bf16_native() == (native, why)


def test_cpu_bf16_detection_on_older_torch(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_native() == (True, "AVX512_BF16")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert precision.cpu_bf16_native()[0] is False


def test_detection_agrees_with_torch_here():
    caps = torch.cpu.get_capabilities()
    expected = bool(caps.get("avx512_bf16") or caps.get("amx_bf16") or caps.get("bf16")
                    or caps.get("sve_bf16")) and torch.backends.mkldnn.is_available()
    assert precision.cpu_bf16_native()[0] == expected


@pytest.mark.parametrize("native, speedup, expected", [
    (True, 2.0, "precision: bf16 autocast (auto: this CPU computes bf16 natively, FEATURE; its "
                "bf16 GEMMs measured 2.0x fp32's speed)"),
    (True, 0.55, "precision: fp32 (auto: this CPU computes bf16 natively (FEATURE) but its bf16 "
                 "GEMMs measured 0.55x fp32's speed; --amp forces bf16 on)"),
    (False, None, "precision: fp32 (auto: bf16 would be emulated on this CPU, FEATURE; --amp "
                  "forces bf16 on)"),
])
def test_resolve_amp_on_cpu(monkeypatch, native, speedup, expected):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (native, "FEATURE"))
    timed = []
    monkeypatch.setattr(precision, "cpu_bf16_gemm_speedup",
                        lambda threads: timed.append(threads) or speedup)
    cpu = torch.device("cpu")
    for auto in (None, "auto", "AUTO"):
        on, line = precision.resolve_amp(cpu, auto)
        assert on is (native and speedup > 1.25)
        assert line == expected
    assert timed == ([torch.get_num_threads()] * 3 if native else [])  # emulated: not timed
    on, line = precision.resolve_amp(cpu, True)
    assert on and line.startswith("precision: bf16 autocast (amp forced on;")
    assert ("native: FEATURE" if native else "emulated, slower than fp32: FEATURE") in line
    assert precision.resolve_amp(cpu, False) == (False, "precision: fp32 (amp forced off)")
    with pytest.raises(ValueError, match="true, false or auto"):
        precision.resolve_amp(cpu, "sometimes")


def test_bf16_gemm_speedup_is_measured_here():
    """The probe times real GEMMs: a positive, finite ratio, the thread count restored."""
    before = torch.get_num_threads()
    precision.cpu_bf16_gemm_speedup.cache_clear()
    r = precision.cpu_bf16_gemm_speedup(1)
    assert 0.01 < r < 100 and torch.get_num_threads() == before
    assert precision.cpu_bf16_gemm_speedup(1) == r  # once per process and thread count


def test_resolve_amp_on_cuda(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (False, "irrelevant"))
    cuda = torch.device("cuda")
    assert precision.resolve_amp(cuda) == (True, "precision: fp16 autocast with GradScaler (CUDA)")
    assert precision.resolve_amp(cuda, None, training=False) == (True,
                                                              "precision: fp16 autocast (CUDA)")
    assert precision.resolve_amp(cuda, True)[0] and not precision.resolve_amp(cuda, False)[0]


def test_amp_flags_and_recipe_values(tmp_path):
    from qkformer.config import parse_with_config

    assert train.build_parser().parse_args([]).amp is None  # auto
    assert train.build_parser().parse_args(["--amp"]).amp is True
    assert train.build_parser().parse_args(["--no-amp"]).amp is False
    assert evaluate.build_parser().parse_args(["--checkpoint", "c", "--data-dir", "d"]).amp is None
    recipe = tmp_path / "r.yml"
    recipe.write_text("amp: auto\n")
    args = parse_with_config(train.build_parser(), [], str(recipe))
    assert args.amp == "auto" and precision.resolve_amp(torch.device("cuda"), args.amp)[0]


def test_scripts_print_precision_and_backend_once(monkeypatch, tmp_path, capsys):
    data = write_png_image_folder(tmp_path / "pngs", classes=2, per_class_train=2,
                                  per_class_val=1, size=(20, 20))
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (False, "no AVX512_BF16 (stand-in)"))
    monkeypatch.setattr(precision, "cpu_bf16_gemm_speedup", lambda threads: 2.0)
    out = tmp_path / "run"
    # no recipe (the shipped ones set amp explicitly): the parser's default, auto
    train.main(["--data-dir", str(data), "--output-dir", str(out), "--model", "qkformer_cifar10",
                "--input-size", "16", "--embed-dims", "16", "32", "64", "--depths", "1", "1", "1",
                "--num-heads", "2", "--T", "1", "--workers", "0", "--no-progress",
                "--batch-size", "2", "--epochs", "1", "--warmup-epochs", "0", "--max-iters", "1"])
    printed = capsys.readouterr().out.splitlines()
    assert printed.count("LIF backend: torch (CPU tensors)") == 1
    assert [line for line in printed if line.startswith("precision: ")] == [
        "precision: fp32 (auto: bf16 would be emulated on this CPU, no AVX512_BF16 (stand-in); "
        "--amp forces bf16 on)"]
    assert "amp: false" in (out / "args.yaml").read_text()  # what ran is recorded
    monkeypatch.setattr(precision, "cpu_bf16_native", lambda: (True, "AVX512_BF16 (stand-in)"))
    evaluate.main(["--checkpoint", str(out / "checkpoint-last.pth"), "--data-dir", str(data),
                   "--batch-size", "2", "--workers", "0", "--no-progress"])
    printed = capsys.readouterr().out.splitlines()
    assert printed.count("LIF backend: torch (CPU tensors)") == 1
    assert [line for line in printed if line.startswith("precision: ")] == [
        "precision: bf16 autocast (auto: this CPU computes bf16 natively, AVX512_BF16 "
        "(stand-in); its bf16 GEMMs measured 2.0x fp32's speed)"]


def test_reference_path_neuron_runs_in_the_amp_dtype():
    """The original's computation under autocast hands its LIF neurons 16-bit inputs (so the
    CUDA kernel runs in fp16 there, as spikingjelly's did), not fp32 copies."""
    import collections

    import timm

    from qkformer.neuron import MultiStepLIF

    model = timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                              T=2)
    model.set_fast_path(False)
    seen = collections.Counter()
    for m in model.modules():
        if isinstance(m, MultiStepLIF):
            m.register_forward_pre_hook(lambda m, inp: seen.update([inp[0].dtype]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 16, 16))
    assert seen and set(seen) == {torch.bfloat16}, seen
