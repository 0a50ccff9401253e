"""Independent, plain implementations of published algorithms, to check prunekit against (tests, benchmarks)."""

import torch
from torch import nn


def reference_wanda(model, calib, sparsity, prune_n=0, prune_m=0):
    """The published Wanda algorithm (locuslab/wanda prune_wanda), written plainly and independently:
    catch layer-0 inputs, then per decoder layer: running-average squared input norms one sample at a time,
    W_metric = |W| * sqrt(scaler_row), prune the lowest per output row (or per M-block), re-run the pruned
    layer and feed its outputs to the next."""
    layers = model.model.layers
    cache = {"inps": [], "kwargs": None}

    class Catcher(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x, **kwargs):
            cache["inps"].append(x)
            cache["kwargs"] = kwargs
            raise ValueError

    layers[0] = Catcher(layers[0])
    for sample in calib:
        try:
            model(sample.unsqueeze(0), use_cache=False)
        except ValueError:
            pass
    layers[0] = layers[0].module
    inps, kwargs = cache["inps"], cache["kwargs"]
    for layer in layers:
        subset = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        scaler, counts, handles = {}, {}, []
        for name, lin in subset.items():
            scaler[name] = torch.zeros(lin.in_features)
            counts[name] = 0

            def hook(mod, args, out, name=name, scaler=scaler, counts=counts):
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                scaler[name] *= counts[name] / (counts[name] + 1)
                counts[name] += 1
                scaler[name] += torch.norm(x, p=2, dim=0) ** 2 / counts[name]

            handles.append(lin.register_forward_hook(hook))
        for x in inps:
            layer(x, **kwargs)
        for h in handles:
            h.remove()
        for name, lin in subset.items():
            metric = lin.weight.abs() * torch.sqrt(scaler[name].reshape(1, -1))
            mask = torch.zeros_like(metric, dtype=torch.bool)
            if prune_n:
                for i in range(0, metric.shape[1], prune_m):
                    block = metric[:, i : i + prune_m]
                    mask.scatter_(1, i + torch.topk(block, prune_n, dim=1, largest=False)[1], True)
            else:
                idx = torch.sort(metric, dim=-1, stable=True)[1][:, : int(metric.shape[1] * sparsity)]
                mask.scatter_(1, idx, True)
            lin.weight.data[mask] = 0
        outs = []
        for x in inps:
            out = layer(x, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        inps = outs
