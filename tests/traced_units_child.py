"""Child process of tests/test_kernel_ops.py: torch.compile through the units' ``triton_op``
twins on the CPU, with no GPU.

Two phases, because one process cannot both trace Triton kernels and run them on the CPU
(``TRITON_INTERPRET=1`` must be set before triton is imported, and then ``triton.jit`` gives
interpreted functions, which ``wrap_triton`` leaves untraced):

``analyse OUT``: plain Triton. The model is compiled (``fullgraph=True``) on the Triton route
with the JIT kernels; torch's own analysis of which arguments each kernel writes runs for an
sm_90 target (Triton's compiler needs no GPU for that, only a driver that names the target).
Writes the kernels found in the forward and backward graphs, any op left opaque, and the
written arguments per kernel to OUT (JSON).

``run IN``: interpreter. The JIT kernels are loaded a second time with the interpreter off, for
tracing; the written arguments come from IN; the compiled graphs then run with the interpreted
kernels swapped in, and the logits, gradients and BatchNorm buffers are compared with eager
execution of the same kernels. Prints the comparison (JSON).
"""
import copy
import importlib.util
import json
import os
import sys


def _model(torch, timm):
    torch.manual_seed(0)
    return timm.create_model("qkformer_10_384", embed_dims=32, depths=(1, 1, 1), num_heads=2,
                             img_size=32, T=2, num_classes=5).double().train()


def _compile(torch, model, on_graph):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(gm, inputs):
        on_graph(gm)
        return make_boxed_func(gm)

    torch._dynamo.reset()
    torch._functorch.config.force_non_lazy_backward_lowering = True  # the backward traced too
    return torch.compile(model, backend=aot_autograd(fw_compiler=compiler, bw_compiler=compiler),
                         fullgraph=True, dynamic=False)


def _kernel_nodes(gm):
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    for node in gm.graph.nodes:
        if node.op == "call_function" and "triton_kernel_wrapper" in str(node.target):
            yield node, kernel_side_table.get_kernel(node.kwargs["kernel_idx"])


def analyse(out_path):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget

    class Sm90:  # what torch's analysis of a kernel asks of the driver: the target
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    triton.runtime.driver.set_active(Sm90())
    import timm

    import qkformer  # noqa: F401
    from qkformer import fused

    found = {"forward": [], "backward": [], "opaque": [], "writes": {}}
    graphs = []

    def on_graph(gm):
        phase = "forward" if not graphs else "backward"
        graphs.append(gm)
        for node in gm.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("qkformer."):
                found["opaque"].append(str(node.target))
        for node, kernel in _kernel_nodes(gm):
            name = kernel.fn.__name__
            found[phase].append(name)
            written = set(found["writes"].get(name, [])) | set(node.kwargs["tensors_to_clone"])
            found["writes"][name] = sorted(written)

    with fused.forced_route("triton"):
        model = _model(torch, timm)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        out = _compile(torch, model, on_graph)
        # tracing only: the JIT kernels cannot run here
        try:
            y = out(x)
            (y ** 2).sum().backward()
        except Exception as e:  # noqa: BLE001 - the first launch of a JIT kernel on the CPU
            found["stopped_at"] = f"{type(e).__name__}"
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(found, f)


def run(in_path):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with open(in_path, encoding="utf-8") as f:
        writes = json.load(f)["writes"]
    import torch
    import torch._higher_order_ops.triton_kernel_wrap as wrap
    import timm

    import qkformer  # noqa: F401
    from qkformer import fused, triton_units
    from qkformer.triton_units import kernels as interpreted

    # the kernels again, decorated with the interpreter off: what tracing captures
    os.environ["TRITON_INTERPRET"] = "0"
    spec = importlib.util.spec_from_file_location("jit_kernels", interpreted.__file__)
    jit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jit)
    os.environ["TRITON_INTERPRET"] = "1"

    def mutated(kernel_idx, constant_args_idx, kwargs, tma_descriptor_metadata):
        name = wrap.kernel_side_table.get_kernel(kernel_idx).fn.__name__
        return [a for a in writes[name] if a in kwargs]

    wrap.get_mutated_tensors = mutated
    triton_units._INTERPRET = False  # the route takes the twins
    launched = []

    def on_graph(gm):
        for node, kernel in _kernel_nodes(gm):
            launched.append(kernel.fn.__name__)
            table = wrap.kernel_side_table.id_to_kernel
            table[node.kwargs["kernel_idx"]] = getattr(interpreted, kernel.fn.__name__)

    result = {}
    with fused.forced_route("triton"):
        compiled_model = _model(torch, timm)
        eager = copy.deepcopy(compiled_model)
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        triton_units._state.update(kernels=jit, probed=True)
        out = _compile(torch, compiled_model, on_graph)(x)
        (out ** 2).sum().backward()
        triton_units._state.update(kernels=interpreted)
        ref = eager(x)
        (ref ** 2).sum().backward()
    result["kernels_run"] = sorted(set(launched))
    result["logits_equal"] = bool(torch.equal(out, ref))
    result["grads_differ"] = [n for (n, a), b in zip(compiled_model.named_parameters(),
                                                     eager.parameters())
                              if not torch.equal(a.grad, b.grad)]
    result["buffers_differ"] = [n for (n, a), b in zip(compiled_model.named_buffers(),
                                                       eager.buffers()) if not torch.equal(a, b)]
    result["steps_tracked"] = sorted({int(b) for n, b in compiled_model.named_buffers()
                                      if n.endswith("num_batches_tracked")})
    print(json.dumps(result))


if __name__ == "__main__":
    {"analyse": analyse, "run": run}[sys.argv[1]](sys.argv[2])
