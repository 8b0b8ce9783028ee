"""Analysis tools: firing rates, energy/SOPs, attention cost vs N, attention maps, time steps, curves."""
import csv
import importlib
import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import qkformer  # noqa: F401  (timm registration)
from qkformer.analysis import (attention_cost, attention_maps, curves, energy, firing, fit_slopes,
                               timesteps)
from qkformer.analysis import _common as analysis_common
from qkformer.analysis._common import synthetic_batches
from qkformer.attention import QKTokenAttention, SpikingSelfAttention
from qkformer.data.synthetic_images import write_png_image_folder
from qkformer.functional import encode_static, per_frame
from qkformer.neuron import MultiStepLIF

REPO = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=32, depths=(1, 1, 1), num_heads=2, num_classes=4, T=2, img_size=8)


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give BN the batch statistics of ``x`` and a bias of 1.5 so that about half the neurons fire
    (an untrained model in eval mode is almost silent)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.momentum = None  # cumulative average: one batch sets the running statistics
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        nn.init.constant_(bn.bias, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", **TINY)
    batches = synthetic_batches(model, batches=2, batch_size=3)
    return _calibrate(model, batches[0]), batches


class Toy(nn.Module):
    """Encoding conv (analog input) -> LIF -> two convs, one on spikes and one on a spike *sum*.

    With an all-ones image, the LIF input is 1.5 (channel 0) and 4.0 (channel 1) at every step.
    Channel 0: H = 0.75, 1.125 (spike), 0.75 -> spikes 0,1,0; channel 1 fires every step. Over
    T = 3 the firing rate is (1/3 + 1) / 2 = 2/3, and s + s has a mean count of 4/3.
    """

    def __init__(self, T=3):
        super().__init__()
        self.T = T
        self.enc = nn.Conv2d(1, 2, 1, bias=False)
        with torch.no_grad():
            self.enc.weight.copy_(torch.tensor([1.5, 4.0]).view(2, 1, 1, 1))
        self.lif = MultiStepLIF()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 3, 1)

    def forward(self, x):
        s = self.lif(per_frame(encode_static(x, self.T), self.enc))
        return per_frame(s, self.conv).mean() + per_frame(s + s, self.conv2).mean()


# ------------------------------------------------------------------------------------ firing
def test_firing_rates_closed_form():
    ones, zeros = torch.ones(2, 1, 4, 5), torch.zeros(2, 1, 4, 5)
    (r,) = firing.firing_rates(Toy(), [ones])
    assert (r.name, r.stage, r.threshold, r.neurons) == ("lif", 0, 1.0, 2 * 4 * 5)
    assert r.rate == pytest.approx(2 / 3)
    # Accumulated over batches (a silent batch of the same size halves the rate), and over a
    # DataLoader-style (x, y) iterable.
    (r,) = firing.firing_rates(Toy(), [(ones, None), (zeros, None)])
    assert r.rate == pytest.approx(1 / 3)


def test_firing_rates_every_neuron(tiny, tmp_path):
    model, batches = tiny
    rates = firing.firing_rates(model, batches)
    lifs = {n: m for n, m in model.named_modules() if isinstance(m, MultiStepLIF)}
    assert [r.name for r in rates] == list(lifs)
    by_name = {r.name: r for r in rates}
    assert by_name["stage1.0.tssa.attn_lif"].threshold == 0.5
    assert by_name["stage1.0.tssa.attn_lif"].neurons == 2 * 8 * 8  # heads x tokens
    assert by_name["stage3.0.ssa.proj_lif"].neurons == 32 * 2 * 2  # legacy [T*B, C*N] layout
    assert {r.stage for r in rates} == {1, 2, 3}
    assert all(0 <= r.rate <= 1 for r in rates) and 0.2 < sum(r.rate for r in rates) / len(rates) < 0.8
    # Independent check of one layer: mean of its output over both batches.
    outs = []
    h = model.stage2[0].mlp.mlp1_lif.register_forward_hook(lambda m, a, o: outs.append(o))
    with torch.no_grad(), model.reference_path():  # module hooks see the neurons on this path
        for x in batches:
            model(x)
    h.remove()
    assert by_name["stage2.0.mlp.mlp1_lif"].rate == pytest.approx(float(torch.cat(outs).mean()))
    paths = firing.save_firing_rates(rates, tmp_path)
    assert len(json.loads(paths["json"].read_text())) == len(rates)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[0].keys() == {"name", "stage", "threshold", "rate", "neurons"}
    assert paths["png"].stat().st_size > 0


# ------------------------------------------------------------------------------------ energy
def test_energy_closed_form():
    H, W, T = 4, 5, 3
    rep = energy.measure_energy(Toy(T), [torch.ones(2, 1, H, W)])
    layers = {l.name: l for l in rep.layers}
    enc, conv, conv2 = layers["enc"], layers["conv"], layers["conv2"]
    # FLOPs per image and time step, from the shapes.
    assert (enc.flops, conv.flops, conv2.flops) == (2 * H * W, 4 * H * W * 2 * 9, 3 * H * W * 2)
    assert (enc.op, conv.op, conv2.op) == ("MAC", "AC", "AC")
    assert conv.spike_driven and not conv2.spike_driven  # s + s is a count (like docs/original.md Q9)
    assert conv.input_rate == pytest.approx(2 / 3) and conv2.input_rate == pytest.approx(4 / 3)
    sops = 2 / 3 * 1440 * T + 4 / 3 * 120 * T  # T enters exactly once
    assert rep.mac_ops == 40  # the static image is encoded once
    assert rep.sops == pytest.approx(sops)
    assert rep.sops_non_binary == pytest.approx(4 / 3 * 120 * T)
    assert rep.total_mj == pytest.approx((4.6 * 40 + 0.9 * sops) * 1e-9)  # pJ -> mJ
    assert rep.summary()["non_binary_layers"] == ["conv2"]
    # Constants are parameters; counting the encoding conv at every step is an option.
    rep = energy.measure_energy(Toy(T), [torch.ones(2, 1, H, W)], e_mac_pj=1.0, e_ac_pj=2.0,
                                encode_once=False)
    assert rep.mac_ops == 40 * T
    assert rep.total_mj == pytest.approx((1.0 * 40 * T + 2.0 * sops) * 1e-9)


def test_energy_qkformer(tiny, tmp_path):
    model, batches = tiny
    spikes = {}

    def grab(name):
        def hook(m, a, out):
            spikes[name] = spikes.get(name, 0.0) + float(out.sum())
        return hook

    watched = {"stage1.0.tssa.q_lif": model.stage1[0].tssa.q_lif,
               "stage1.0.tssa.attn_lif": model.stage1[0].tssa.attn_lif,
               "stage3.0.ssa.q_lif": model.stage3[0].ssa.q_lif,
               "stage3.0.ssa.k_lif": model.stage3[0].ssa.k_lif}
    handles = [m.register_forward_hook(grab(n)) for n, m in watched.items()]
    try:
        rep = energy.measure_energy(model, batches)
    finally:
        for h in handles:
            h.remove()
    images = sum(len(x) for x in batches)
    layers = {l.name: l for l in rep.layers}
    assert rep.images == images and rep.T == 2
    assert [l.name for l in rep.layers if l.op == "MAC"] == ["patch_embed1.proj_conv"]
    assert layers["patch_embed1.proj_conv"].steps == 1
    assert layers["head"].steps == 1 and layers["stage1.0.mlp.mlp2_conv"].steps == 2
    # Q9: convs reading the residual stream see counts; convs after a LIF see spikes.
    for name in ("patch_embed2.proj3_conv", "patch_embed2.proj_res_conv", "stage2.0.tssa.q_conv",
                 "stage3.0.ssa.v_conv", "stage3.0.mlp.mlp1_conv", "head"):
        assert not layers[name].spike_driven, name
    for name in ("patch_embed1.proj1_conv", "patch_embed1.proj_res_conv", "patch_embed2.proj4_conv",
                 "stage1.0.tssa.proj_conv", "stage3.0.ssa.proj_conv", "stage2.0.mlp.mlp2_conv"):
        assert layers[name].spike_driven, name
    # Attention ops in closed form: one accumulate per q spike (sum), d per open gate (mask),
    # d per k spike (k^T v) and d per q spike (q kv). Widths 8/16/32 with 2 heads: d = 4 and 16.
    d1, d3 = 8 // 2, 32 // 2
    assert layers["stage1.0.tssa.qk_sum"].ops == pytest.approx(spikes["stage1.0.tssa.q_lif"] / images)
    assert layers["stage1.0.tssa.qk_mask"].ops == pytest.approx(
        spikes["stage1.0.tssa.attn_lif"] * d1 / images)
    assert layers["stage3.0.ssa.qkv_matmul"].ops == pytest.approx(
        spikes["stage3.0.ssa.q_lif"] * d3 / images)
    assert layers["stage3.0.ssa.kv_matmul"].ops == pytest.approx(
        spikes["stage3.0.ssa.k_lif"] * d3 / images)
    assert layers["stage3.0.ssa.kv_matmul"].flops == 4 * 32 * d3  # N * C * d, N = 2x2 tokens
    # Totals are the sums of the table.
    ac = sum(l.ops for l in rep.layers if l.op == "AC")
    assert rep.total_mj == pytest.approx((4.6 * rep.mac_ops + 0.9 * ac) * 1e-9)
    assert 0 < rep.energy_mj_non_binary < rep.total_mj
    paths = energy.save_energy(rep, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["summary"]["total_mj"] == pytest.approx(rep.total_mj)
    assert len(list(csv.DictReader(paths["csv"].open()))) == len(rep.layers)
    assert "G SOP" in rep.table()


# ---------------------------------------------------------------------------- attention cost
def _benchmark_module():
    spec = importlib.util.spec_from_file_location("bench_attention_cost",
                                                  REPO / "benchmarks" / "attention_cost.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_cost_slopes(tmp_path):
    bench = _benchmark_module()
    # The N x N form agrees with the package's SSA (same weights): only the product order differs.
    torch.manual_seed(0)
    ssa = SpikingSelfAttention(8, 2)
    qk_first = bench.SSAQKFirst(8, 2)
    qk_first.load_state_dict(ssa.state_dict())
    x = (torch.rand(2, 1, 8, 4, 4) < 0.5).float()
    assert torch.equal(ssa.eval()(x), qk_first.eval()(x))

    modules = {**attention_cost.DEFAULT_MODULES, "qk_first": bench.SSAQKFirst}
    points = attention_cost.measure_attention_cost(modules, ns=(256, 512, 1024, 2048), dim=8,
                                                   heads=2, T=2, repeats=0)  # memory only
    assert {p.method for p in points} == {"saved_tensors+output"}
    slopes = fit_slopes(points)
    for name in ("QKTA", "QKCA", "SSA"):
        assert slopes[name] == pytest.approx(1.0, abs=0.05), slopes
    assert 1.8 < slopes["qk_first"] < 2.05, slopes
    paths = attention_cost.save_attention_cost(points, tmp_path)
    assert len(list(csv.DictReader(paths["csv"].open()))) == 16
    assert paths["png"].stat().st_size > 0


def test_attention_cost_skips_large_n():
    points = attention_cost.measure_attention_cost({"QKTA": QKTokenAttention}, ns=(16, 64), dim=4,
                                                   heads=2, T=1, repeats=1, max_n={"QKTA": 16})
    assert [p.N for p in points] == [16]


# ---------------------------------------------------------------------------- attention maps
def test_attention_maps(tiny, tmp_path):
    model, batches = tiny
    x = batches[0][:2]
    qs = {}
    hooks = [model.get_submodule(f"stage{i}.0.tssa.q_lif").register_forward_hook(
        lambda m, a, o, i=i: qs.__setitem__(i, o)) for i in (1, 2)]
    maps = attention_maps.token_attention_maps(model, x)
    for h in hooks:
        h.remove()
    assert list(maps) == ["stage1.0.tssa", "stage2.0.tssa"]
    assert maps["stage1.0.tssa"].shape == (2, 8, 8) and maps["stage2.0.tssa"].shape == (2, 4, 4)
    # At V_th = 0.5 the mask neuron fires iff a head's q count is >= 1 (docs/original.md §1.4).
    for i, key in ((1, "stage1.0.tssa"), (2, "stage2.0.tssa")):
        q = qs[i]  # [T, B, C, N]
        T, B, C, N = q.shape
        expect = (q.reshape(T, B, 2, C // 2, N).sum(3) >= 1).float().mean((0, 2))
        assert torch.equal(maps[key].flatten(1), expect)
    with pytest.raises(ValueError, match="no QKTokenAttention"):
        attention_maps.token_attention_maps(model, x, stages=(3,))
    path = attention_maps.render_attention_maps(attention_maps.display_image(x[0]),
                                                {k: v[0] for k, v in maps.items()},
                                                tmp_path / "maps.png")
    assert path.stat().st_size > 0


def test_attention_maps_cli_image(tmp_path, capsys):
    root = write_png_image_folder(tmp_path / "imgs", classes=1, per_class_train=1, per_class_val=1,
                                  size=(10, 12))
    image = next((root / "val").rglob("*.png"))
    out = tmp_path / "maps"
    attention_maps.main(["--model", "qkformer_cifar10", "--model-kwargs", json.dumps(TINY),
                         "--image", str(image), "--out", str(out)])
    text = capsys.readouterr().out
    assert _written(text) == [out / "attention_maps.png"] and "stage2.0.tssa" in text
    assert (out / "attention_maps.png").stat().st_size > 0


# ------------------------------------------------------------------------------- time steps
def test_timesteps(tiny, tmp_path, capsys):
    model, _ = tiny
    root = write_png_image_folder(tmp_path / "data", classes=4, per_class_train=1, per_class_val=2,
                                  size=(8, 8))
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "ts"
    timesteps.main(["--model", "qkformer_cifar10", "--model-kwargs", json.dumps(TINY),
                    "--checkpoint", str(ckpt), "--data-dir", str(root), "--batch-size", "5",
                    "--ts", "1", "2", "3", "--out", str(out)])
    results = json.loads((out / "timesteps.json").read_text())
    assert [r["T"] for r in results] == [1, 2, 3]
    assert all(r["images"] == 8 and 0 <= r["acc1"] <= r["acc5"] <= 100 for r in results)
    assert all(r["energy_mj"] > 0 for r in results) and (out / "timesteps.png").stat().st_size > 0
    assert "T=3" in capsys.readouterr().out
    # The API restores model.T; event models are refused.
    res = timesteps.evaluate_timesteps(model, [torch.randn(2, 3, 8, 8)], ts=(1, 4))
    assert model.T == 2 and res[0].acc1 is None and res[1].T == 4
    dvs = timm.create_model("qkformer_cifar10_dvs", embed_dims=32, num_classes=4, img_size=16)
    with pytest.raises(ValueError, match="event"):
        timesteps.evaluate_timesteps(dvs, [])


# ----------------------------------------------------------------------------------- curves
def test_reference_curves_package_data():
    from importlib import resources

    assert resources.files("qkformer.analysis").joinpath("reference_curves.json").is_file()
    names = curves.reference_names()
    assert {"imagenet_10_384", "imagenet_10_512", "imagenet_10_768", "cifar10", "cifar100",
            "cifar10_dvs"} <= set(names)
    assert curves.load_reference("cifar10")["best"] == {"epoch": 395, "acc1": 96.21}
    assert curves.load_reference("CIFAR10-DVS")["best"]["acc1"] == 84.1
    assert curves.load_reference("qkformer_10_768")["final"]["acc1"] == 84.266
    assert curves.load_reference("imagenet_10_512")["train_loss"][-1] == [199, 2.114]
    for name in names:  # milestones sorted, final = last milestone
        ref = curves.load_reference(name)
        epochs = [e for e, _ in ref["test_acc1"]]
        assert epochs == sorted(epochs) and ref["test_acc1"][-1] == [ref["final"]["epoch"],
                                                                    ref["final"]["acc1"]]
    with pytest.raises(KeyError, match="known"):
        curves.load_reference("mnist")


def test_curves_cli(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("\n".join(json.dumps({"epoch": e, "test_acc1": 30.0 + e, "train_loss": 2 - e / 20})
                             for e in range(21)) + "\n\n")
    out = tmp_path / "curves"
    curves.main(["--log", str(log), "--dataset", "cifar10", "--out", str(out)])
    text = capsys.readouterr().out
    assert _written(text) == [out / "curves.csv", out / "curves.png"]
    assert (out / "curves.png").stat().st_size > 0
    assert "epoch   20  reference  80.670  run  50.000  delta -30.670" in text
    rows = curves.compare_to_reference(curves.read_log(log), curves.load_reference("cifar10"))
    assert [r["epoch"] for r in rows] == [0, 1, 10, 20]
    saved = list(csv.DictReader((out / "curves.csv").open()))
    assert [(int(r["epoch"]), float(r["run"]), float(r["reference"])) for r in saved] == [
        (r["epoch"], r["run"], r["reference"]) for r in rows]
    log.write_text('{"epoch": 0, "test_acc1": 1}\nnot json\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        curves.read_log(log)


# ------------------------------------------------------------------------------------- CLIs
def test_firing_and_energy_cli(tmp_path, capsys):
    common = ["--model", "qkformer_cifar10", "--model-kwargs", json.dumps(TINY), "--synthetic",
              "--batches", "1", "--batch-size", "2"]
    firing.main(common + ["--out", str(tmp_path / "f")])
    energy.main(common + ["--out", str(tmp_path / "e")])
    for f in ("f/firing_rates.json", "f/firing_rates.csv", "f/firing_rates.png", "e/energy.json",
              "e/energy.csv"):
        assert (tmp_path / f).stat().st_size > 0, f
    assert "mJ/image" in capsys.readouterr().out


def _written(text: str):
    """The paths a tool reports as ``wrote <kind>: <path>``, in order."""
    return [Path(line.split(": ", 1)[1]) for line in text.splitlines() if line.startswith("wrote ")]


def _cli_args(tool, tmp_path):
    model = ["--model", "qkformer_cifar10", "--model-kwargs", json.dumps(TINY)]
    data = ["--synthetic", "--batches", "1", "--batch-size", "2"]
    if tool is attention_cost:
        return ["--ns", "16", "64", "--dim", "8", "--heads", "2", "--T", "1", "--repeats", "1"]
    if tool is attention_maps:
        return [*model, "--synthetic"]
    if tool is timesteps:
        return [*model, *data, "--ts", "1", "2"]
    if tool is curves:
        log = tmp_path / "log.jsonl"
        log.write_text(json.dumps({"epoch": 0, "test_acc1": 20.0}) + "\n")
        return ["--log", str(log), "--dataset", "cifar10"]
    return [*model, *data]


OUT_FILES = {firing: {"firing_rates.json", "firing_rates.csv", "firing_rates.png"},
             energy: {"energy.json", "energy.csv"},
             attention_cost: {"attention_cost.csv", "attention_cost.png"},
             attention_maps: {"attention_maps.png"},
             timesteps: {"timesteps.json", "timesteps.png"},
             curves: {"curves.csv", "curves.png"}}


@pytest.mark.parametrize("tool", list(OUT_FILES), ids=lambda t: t.__name__.rsplit(".", 1)[1])
def test_out_is_a_folder_for_every_tool(tool, tmp_path, capsys):
    args = _cli_args(tool, tmp_path)
    out = tmp_path / "not" / "yet"  # created, parents included
    tool.main([*args, "--out", str(out)])
    written = _written(capsys.readouterr().out)
    # every path printed is real and in --out, and nothing else was written there
    assert {p.name for p in written} == OUT_FILES[tool] == {p.name for p in out.iterdir()}
    assert all(p.parent == out and p.stat().st_size > 0 for p in written)
    a_file = tmp_path / "taken"
    a_file.write_text("")
    with pytest.raises(ValueError, match="--out .*taken is a file"):
        tool.main([*args, "--out", str(a_file)])


def test_cli_user_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qkformer.analysis.firing", "--model", "qkformer_cifar1",
                        "--synthetic", "--out", str(tmp_path)], capture_output=True, text=True,
                       cwd=tmp_path)
    assert r.returncode == 1 and not list(tmp_path.iterdir())
    assert r.stderr.startswith("error: unknown --model 'qkformer_cifar1'") and r.stderr.count("\n") == 1
    assert "qkformer_cifar10" in r.stderr


@pytest.mark.parametrize("tool", [firing, energy, attention_cost, attention_maps, timesteps, curves])
def test_cli_help(tool, capsys):
    with pytest.raises(SystemExit) as e:
        tool.main(["--help"])
    assert e.value.code == 0 and "usage: python -m qkformer.analysis." in capsys.readouterr().out


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "qkformer.analysis.curves", "--help"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "--dataset" in r.stdout


# ------------------------------------------------------------------- plots: extents, axes, titles
def _capture_figures(monkeypatch, module):
    """The figures ``module`` hands to ``save_figure``, kept for inspection (still written)."""
    from qkformer.analysis import _common

    figures = []

    def save(fig, path):
        figures.append({"suptitle": fig._suptitle.get_text() if fig._suptitle else "",
                        "axes": [(ax.get_xlim(), [line.get_label() for line in ax.get_lines()],
                                  [line.get_xdata() for line in ax.get_lines()], ax.get_title())
                                 for ax in fig.axes]})
        return _common.save_figure(fig, path)

    monkeypatch.setattr(module, "save_figure", save)
    return figures


def test_attention_map_overlay_shares_the_image_extent():
    H, W = 10, 12
    image = torch.rand(H, W, 3)
    maps = {"stage1.0.tssa": torch.rand(5, 6), "stage2.0.tssa": torch.rand(2, 3)}
    fig = attention_maps.attention_map_figure(image, maps, title="qkformer_cifar10, x.png, T=2")
    try:
        panels = [ax for ax in fig.axes if len(ax.images) == 2]
        assert len(panels) == len(maps)
        for ax in panels:
            picture, overlay = ax.images
            # both span the same pixel edges, so token (i, j) covers exactly its image pixels
            assert tuple(overlay.get_extent()) == tuple(picture.get_extent()) == (0, W, H, 0)
        assert tuple(fig.axes[0].images[0].get_extent()) == (0, W, H, 0)
        assert fig._suptitle.get_text() == "qkformer_cifar10, x.png, T=2"
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def _run_folder(tmp_path, epochs, dataset="cifar10", data_dir=None, logged=None):
    """A run folder as training leaves it: log.jsonl and args.yaml."""
    import yaml

    run = tmp_path / "run"
    run.mkdir()
    logged = epochs if logged is None else logged
    (run / "log.jsonl").write_text("".join(
        json.dumps({"epoch": e, "test_acc1": 40.0 + 5 * e, "train_loss": 2.0 - 0.1 * e}) + "\n"
        for e in range(logged)))
    (run / "args.yaml").write_text(yaml.safe_dump({
        "dataset": dataset, "epochs": epochs, "model": "qkformer_cifar10", "T": 2,
        "data_dir": str(data_dir or tmp_path / "data")}))
    return run / "log.jsonl"


def test_curves_axis_spans_the_run_and_reference_matches_its_dataset(tmp_path, monkeypatch, capsys):
    figures = _capture_figures(monkeypatch, curves)
    log = _run_folder(tmp_path, epochs=12, logged=8)
    curves.main(["--log", str(log), "--dataset", "cifar10", "--out", str(tmp_path / "c")])
    acc_axis, loss_axis = figures[-1]["axes"]
    (left, right), labels, xs, _ = acc_axis
    # the run's 12 epochs (0..11), not the reference's 410
    assert -1 < left < 0 and 11 < right < 12
    assert loss_axis[0] == (left, right)
    ref = labels.index("reference: " + curves.load_reference("cifar10")["label"])
    assert max(xs[ref]) <= 11 and list(xs[ref]) == [0, 1, 10]  # milestones within the run
    assert figures[-1]["suptitle"] == "qkformer_cifar10, cifar10, T=2"
    # the comparison: the milestones the run has logged (epochs 0..7)
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("epoch ")] == ["0", "1"]


def test_curves_leave_out_a_reference_of_another_dataset(tmp_path, monkeypatch, capsys):
    from qkformer.data.synthetic_images import write_digits_image_folder

    figures = _capture_figures(monkeypatch, curves)
    data = write_digits_image_folder(tmp_path / "digits", size=8)
    # the demo: the cifar10 recipe on the digits folder
    log = _run_folder(tmp_path, epochs=12, data_dir=data)
    assert curves.read_run_settings(log) == {"dataset": "digits", "epochs": 12,
                                             "model": "qkformer_cifar10", "T": 2}
    out = tmp_path / "c"
    curves.main(["--log", str(log), "--dataset", "cifar10", "--out", str(out)])
    text = capsys.readouterr().out
    assert "reference cifar10 not drawn: the run trained on digits" in text
    labels = [label for axis in figures[-1]["axes"] for label in axis[1]]
    assert labels and not [label for label in labels if "reference" in label]
    assert (out / "curves.csv").read_text().splitlines() == ["epoch,reference,run,delta"]
    # without --dataset: digits has no reference curve, and the run alone is drawn
    curves.main(["--log", str(log), "--out", str(tmp_path / "c2")])
    assert not [label for axis in figures[-1]["axes"] for label in axis[1] if "reference" in label]
    # --run-dataset corrects what args.yaml says
    curves.main(["--log", str(log), "--dataset", "cifar10", "--run-dataset", "cifar10",
                 "--out", str(tmp_path / "c3")])
    assert any("reference" in label for label in figures[-1]["axes"][0][1])
    # a log without args.yaml and no --dataset: nothing to compare with
    (log.parent / "args.yaml").unlink()
    with pytest.raises(ValueError, match="--dataset is needed"):
        curves.main(["--log", str(log), "--out", str(tmp_path / "c4")])


def test_plot_titles_name_model_data_and_T(tmp_path, monkeypatch, capsys):
    model = ["--model", "qkformer_cifar10", "--model-kwargs", json.dumps(TINY)]
    data = ["--synthetic", "--batches", "1", "--batch-size", "2"]
    figs = _capture_figures(monkeypatch, firing)
    firing.main([*model, *data, "--out", str(tmp_path / "f")])
    assert figs[-1]["suptitle"] == "firing rates: qkformer_cifar10, synthetic input, T=2"
    figs = _capture_figures(monkeypatch, timesteps)
    timesteps.main([*model, *data, "--ts", "1", "3", "--out", str(tmp_path / "t")])
    assert figs[-1]["suptitle"] == "qkformer_cifar10, synthetic input, T=1, 3 (model: T=2)"
    figs = _capture_figures(monkeypatch, attention_cost)
    attention_cost.main(["--ns", "16", "64", "--dim", "8", "--heads", "2", "--T", "3",
                         "--repeats", "1", "--out", str(tmp_path / "a")])
    assert figs[-1]["suptitle"] == "QKTA / QKCA / SSA, random spikes, T=3, C=8, heads=2, batch=1"
    capsys.readouterr()


def test_data_label_names_the_folder_and_split(tmp_path):
    from argparse import Namespace

    from qkformer.analysis._common import data_label, run_title

    folder = Namespace(synthetic=False, data_dir=tmp_path, split="val")
    assert data_label(folder) == f"{tmp_path} (val)"
    assert data_label(Namespace(synthetic=True, data_dir=None, split="val")) == "synthetic input"
    assert run_title("m", None, 4, C=8, heads=None) == "m, T=4, C=8"


class _FakeClock:
    """Stands in for the timer: each timed pass (two readings) lasts the next given duration."""

    def __init__(self, durations):
        self.durations, self.now, self.started = list(durations), 0.0, False

    def __call__(self):
        if self.started:
            self.now += self.durations.pop(0)
        self.started = not self.started
        return self.now


@pytest.mark.parametrize("durations, runs, spread", [
    ([1.0, 1.02, 1.05], 3, 0.02),                       # steady: the requested passes
    ([1.0, 2.0, 2.0, 1.0, 1.0], 5, 0.0),                # noisy, then settles: more passes
    ([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0], 9, 1.0),  # never settles: 3x, then flagged
])
def test_attention_cost_times_repeat_until_stable(monkeypatch, durations, runs, spread):
    clock = _FakeClock(durations)
    monkeypatch.setattr(attention_cost, "_clock", clock)
    x = (torch.rand(1, 1, 8, 4, 4) < 0.3).float().requires_grad_()
    m = attention_cost.measure_module(QKTokenAttention(8, 2), x, repeats=3)
    assert m.timed_runs == runs and not clock.durations  # every planned pass ran, no more
    assert m.time_s == 1.0 and m.time_spread == pytest.approx(spread)


def test_attention_cost_warns_about_unstable_times(monkeypatch, tmp_path):
    monkeypatch.setattr(attention_cost, "_clock", _FakeClock([1.0] + [2.0] * 5))
    with pytest.warns(RuntimeWarning, match="1 of 1 times are not stable.*QKTA at N=16"):
        points = attention_cost.measure_attention_cost({"QKTA": QKTokenAttention}, ns=(16,), dim=8,
                                                       heads=2, T=1, repeats=2)
    assert points[0].timed_runs == 6 and points[0].time_spread == 1.0
    monkeypatch.setattr(attention_cost, "_clock", _FakeClock([1.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stable time: no warning
        attention_cost.measure_attention_cost({"QKTA": QKTokenAttention}, ns=(16,), dim=8,
                                              heads=2, T=1, repeats=2)


# ------------------------------------------------------------------- python -m qkformer.analysis
def _analysis(*args):
    return subprocess.run([sys.executable, "-m", "qkformer.analysis", *args], capture_output=True,
                          text=True, cwd=REPO)


@pytest.mark.parametrize("args", [[], ["--help"]], ids=["plain", "help"])
def test_package_entry_point_lists_every_tool(args):
    r = _analysis(*args)
    assert r.returncode == 0, r.stderr
    listed = {}
    for line in r.stdout.split("tools:\n", 1)[1].splitlines():
        name, _, summary = line.strip().partition("  ")
        listed[name] = summary.strip()
    # every tool module of the package, each with its docstring's first line as plain text
    tools = {p.stem for p in (REPO / "qkformer" / "analysis").glob("*.py")
             if not p.stem.startswith("_")}
    assert set(listed) == tools
    assert listed["firing"] == "Firing rate of every spiking layer (every MultiStepLIF)."
    for name, summary in listed.items():
        doc = importlib.import_module(f"qkformer.analysis.{name}").__doc__
        assert summary and summary.split(" (")[0] in doc.splitlines()[0], name


def test_package_entry_point_runs_a_tool(tmp_path):
    r = _analysis("curves", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m qkformer.analysis.curves")
    r = _analysis("firing", "--model", "qkformer_cifar1", "--synthetic", "--out", str(tmp_path))
    assert r.returncode == 1 and r.stderr.startswith("error: unknown --model 'qkformer_cifar1'")
    r = _analysis("plots")
    assert r.returncode == 2 and "unknown analysis tool 'plots'" in r.stderr


def _trained_checkpoint(tmp_path):
    """A checkpoint as training writes it: weights and the arguments it was trained with (a
    size and T that are not the variant's defaults)."""
    import argparse

    torch.manual_seed(0)
    model = timm.create_model("qkformer_cifar10", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                              T=2, img_size=16, num_classes=10)
    args = argparse.Namespace(model="qkformer_cifar10", T=2, input_size=16, embed_dims=[32],
                              depths=[1, 1, 1], num_heads=[2], mlp_ratio=None, attn_types=None,
                              legacy_ssa=True, dataset="digits")
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": model.state_dict(), "args": args, "epoch": 3}, path)
    return path, model


def test_tools_build_the_model_the_checkpoint_was_trained_as(tmp_path):
    path, trained = _trained_checkpoint(tmp_path)
    model = analysis_common.build_model(None, str(path))
    assert (model.T, model.img_size, model.num_classes) == (2, 16, 10)
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.warns(UserWarning, match="T=3 but the checkpoint was trained with T=2"):
        assert analysis_common.build_model(None, str(path), {"T": 3}).T == 3
    with pytest.raises(ValueError, match="--model is needed"):
        analysis_common.build_model(None, None)
    out = tmp_path / "out"
    firing.main(["--checkpoint", str(path), "--synthetic", "--batches", "1", "--batch-size", "2",
                 "--out", str(out)])
    assert any(out.iterdir())


def test_a_contradicting_flag_is_one_warning_line_on_the_command_line(tmp_path):
    path, _ = _trained_checkpoint(tmp_path)
    r = subprocess.run([sys.executable, "-m", "qkformer.analysis", "firing", "--checkpoint",
                        str(path), "--model-kwargs", '{"T": 3}', "--synthetic", "--batches", "1",
                        "--batch-size", "2", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if "T=3" in line or "warn" in line] == [
        "warning: --model-kwargs T=3 but the checkpoint was trained with T=2"], r.stderr
