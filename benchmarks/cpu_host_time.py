"""Host time per layer call on the CPU at tiny shapes (one thread, the C++ backend, value checks in their
CPU default): the medians of a forward and of a training step, and the value-check ops per step.

    python benchmarks/cpu_host_time.py   (PYTHONPATH=<another checkout> to measure that one)
"""
import json
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastmoe_kernels import MoELayer

torch.set_num_threads(1)
torch.manual_seed(0)
layer = MoELayer(d_model=16, d_ff=8, num_experts=8, top_k=2, fused_experts=False).train()
x = torch.randn(16, 16, requires_grad=True)
def step():
    layer(x).sum().backward()
for _ in range(20): step()
res = {}
for name, fn in (("fwd", lambda: layer(x)), ("fwd+bwd", step)):
    ts = []
    for _ in range(300):
        t0 = time.perf_counter(); fn(); ts.append((time.perf_counter() - t0) * 1e6)
    res[name] = statistics.median(ts)
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(20): step()
ev = {e.key: e for e in prof.key_averages()}
res["value_check_ops_per_step"] = sum(e.count for k, e in ev.items() if k in ("aten::isfinite", "aten::aminmax", "aten::lt", "aten::gt", "aten::any")) / 20
print(json.dumps(res))
