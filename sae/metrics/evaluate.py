"""Full evaluation of an SAE/crosscoder on train and test pairs, every source, spliced metrics included."""
from __future__ import annotations

import torch

from sae.activations import Activations
from sae.activations.modular import ActivationData
from sae.activations.protein import ProteinActivationData
from sae.metrics.downstream import all_layers_replaced_metrics, spliced_source_metrics
from sae.metrics.protein_mlm import masked_lm_metrics
from sae.metrics.reconstruction import dead_fraction, fvu, fvu_all_sources, mse
from sae.saes.base import SparseCoder

EVAL_CHUNK = 16384

# per activation family: how the reconstruction is scored inside the host
DOWNSTREAM = {
    ActivationData: lambda sae, data, split, raw_x, raw_x_hat: spliced_source_metrics(data, split, raw_x, raw_x_hat) | (
        all_layers_replaced_metrics(sae, data, split) if hasattr(sae, "layer_latents") else {}),
    ProteinActivationData: lambda sae, data, split, raw_x, raw_x_hat: masked_lm_metrics(sae, data, split),
}


@torch.no_grad()
def encode_decode(sae: SparseCoder, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_hat, l0 per row, fire counts per latent) in chunks, through the training forward (sparse
    for TopK), without keeping a [rows, d_sae] latent matrix."""
    x_hats, l0s, fire_counts = [], [], torch.zeros(sae.d_sae, device=x.device)
    for chunk in x.split(EVAL_CHUNK):
        out = sae(chunk)
        x_hats.append(out.x_hat)
        l0s.append(out.l0())
        fire_counts += out.fire_counts(sae.d_sae)
    return torch.cat(x_hats), torch.cat(l0s), fire_counts


@torch.no_grad()
def evaluate(sae: SparseCoder, data: Activations, downstream: bool = True) -> dict[str, float]:
    """Metric names: eval/<split>/{fvu,l0,dead_frac} and eval/<split>/<source>/{fvu,mse,ce_*,acc_*,loss_recovered};
    for a transcoder, fvu and mse are of its targets and the spliced metrics replace the target hook
    (e.g. the MLP's output) by its prediction from the clean input (the replacement model);
    a task with several operations adds eval/<split>/<source>/acc_{clean,spliced,zero}_<operation>.
    For protein tasks `data` is a ProteinActivationData and ce_* are masked-LM losses (no acc_*).

    MSE is per element in the host's raw units; FVU does not depend on units.
    """
    was_training = sae.training
    sae.eval()
    metrics: dict[str, float] = {}
    for split in ("train", "test"):
        table = data.eval_table(split)
        x_hat, row_l0, fire_counts = encode_decode(sae, table)
        x = sae.targets_of(table)  # what x_hat reconstructs: the table itself, or a transcoder's targets
        scale = sae.targets_of(data.scale[None, :, None])[0]  # [n_sources, 1]
        prefix = f"eval/{split}"
        metrics[f"{prefix}/fvu"] = fvu_all_sources(x, x_hat).item()
        metrics[f"{prefix}/l0"] = row_l0.mean().item()
        metrics[f"{prefix}/dead_frac"] = dead_fraction(fire_counts).item()
        raw_x, raw_x_hat = x / scale, x_hat / scale
        per_source_fvu, per_source_mse = fvu(x, x_hat), mse(raw_x, raw_x_hat)
        for s, source in enumerate(data.sources):
            metrics[f"{prefix}/{source.name}/fvu"] = per_source_fvu[s].item()
            metrics[f"{prefix}/{source.name}/mse"] = per_source_mse[s].item()
        if downstream:
            spliced = DOWNSTREAM[type(data)](sae, data, split, raw_x, raw_x_hat)
            metrics.update({f"{prefix}/{k}": v for k, v in spliced.items()})
    sae.train(was_training)
    return metrics


def headline(metrics: dict[str, float], source_names: list[str], row_unit: str = "pairs",
             replaced: list[str] | None = None) -> str:
    """A few lines a person reads at the end of a run. replaced: per source, the host hook a transcoder's
    prediction replaces (e.g. blocks.0.mlp_out), named in the spliced lines."""
    lines = []
    where = dict(zip(source_names, replaced or []))
    # names with spliced metrics beyond the sources (a cross-layer transcoder's `<checkpoint>.all_layers`)
    combined = sorted({key.split("/")[2] for key in metrics if key.startswith("eval/test/")
                       and key.endswith("/acc_spliced")} - set(source_names))
    where |= {name: "every MLP out" for name in combined}
    source_names = [*source_names, *combined]
    for split in ("train", "test"):
        p = f"eval/{split}"
        lines.append(f"{split:5s} {row_unit}: FVU {metrics[f'{p}/fvu']:.4f}  L0 {metrics[f'{p}/l0']:.1f}  "
                     f"dead {metrics[f'{p}/dead_frac']:.1%}")
        for name in source_names:
            q = f"{p}/{name}"
            if f"{q}/acc_spliced" not in metrics and f"{q}/ce_spliced" in metrics:  # masked-LM host
                lines.append(f"  {name}: masked-LM CE clean {metrics[f'{q}/ce_clean']:.3f} -> spliced "
                             f"{metrics[f'{q}/ce_spliced']:.3f} (zero-ablated {metrics[f'{q}/ce_zero']:.3f}); "
                             f"loss recovered {metrics[f'{q}/loss_recovered']:.3f}")
            if f"{q}/acc_spliced" in metrics:
                spliced = f"{where[name]} replaced" if name in where else "spliced"
                lines.append(f"  {name}: answer acc clean {metrics[f'{q}/acc_clean']:.3f} -> {spliced} "
                             f"{metrics[f'{q}/acc_spliced']:.3f} (zero-ablated {metrics[f'{q}/acc_zero']:.3f}); "
                             f"CE {metrics[f'{q}/ce_clean']:.3f} -> {metrics[f'{q}/ce_spliced']:.3f}; "
                             f"loss recovered {metrics[f'{q}/loss_recovered']:.3f}")
    return "\n".join(lines)
