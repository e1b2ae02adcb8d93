"""SAEs in other libraries' folder formats, both ways, without needing those libraries installed.

SAELens (`SAE.load_from_disk`): cfg.json + sae_weights.safetensors, W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc [d_sae], b_dec [d_in]; architectures "standard" (ReLU), "topk",
"jumprelu" (+ threshold [d_sae]), "gated" (b_gate, b_mag, r_mag [d_sae] instead of b_enc); b_dec is
subtracted from the input (apply_b_dec_to_input).
EleutherAI sparsify (`Sae.load_from_disk`): cfg.json + sae.safetensors, encoder.weight
[d_sae, d_in], encoder.bias, W_dec [d_sae, d_in], b_dec; TopK only.

Ours -> theirs: vanilla -> standard, topk -> topk (SAELens or sparsify), jumprelu -> jumprelu, gated -> gated,
and BatchTopK / Matryoshka as what they are at inference, a JumpReLU at their threshold θ (the
same θ for every latent). Our checkpoints hold weights in raw activation units (the training
normalisation folded in), so the exported SAE takes raw activations (normalize_activations
"none"). A crosscoder (several sources) has no format in either library: refused.

Transcoders (their inputs are not centred by b_dec in either library: our b_in is folded into the
encoder bias, b_enc - W_enc b_in): SAELens "transcoder" / "skip_transcoder" (ReLU: our vanilla) and
"jumprelu_transcoder" / "jumprelu_skip_transcoder" (our JumpReLU, and BatchTopK / Matryoshka at θ), with
W_dec [d_sae, d_out], b_dec [d_out], W_skip [d_out, d_in]; sparsify `transcode` (+ `skip_connection`,
W_skip [d_out, d_in]) for TopK. SAELens has no TopK transcoder and neither library a gated one: refused.
Theirs -> ours: the same table backwards, so `sae.saes.load` and our metrics run on their SAEs.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae.errors import UserInputError
from sae.saes.base import SparseCoder
from sae.saes.gated import GatedSAE, GatedSAEConfig
from sae.saes.jumprelu import JumpReLUSAE, JumpReLUSAEConfig
from sae.saes.topk import TopKSAE, TopKSAEConfig
from sae.saes.vanilla import VanillaSAE, VanillaSAEConfig

FORMATS = ("saelens", "sparsify")
# our selection rule -> SAELens' transcoder family (+ "_transcoder" or "_skip_transcoder"); "transcoder" is ReLU
SAELENS_TRANSCODERS = {"vanilla": "", "jumprelu": "jumprelu", "batchtopk": "jumprelu", "matryoshka": "jumprelu"}
SAELENS_TRANSCODER_RULES = {"transcoder": "vanilla", "skip_transcoder": "vanilla",
                            "jumprelu_transcoder": "jumprelu", "jumprelu_skip_transcoder": "jumprelu"}
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS = "sae_weights.safetensors", "sae.safetensors"


def foreign_format(path: Path) -> str | None:
    """'saelens' or 'sparsify' for a folder in that library's format, else None."""
    path = Path(path)
    if not (path / "cfg.json").is_file():
        return None
    if (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    return "sparsify" if (path / SPARSIFY_WEIGHTS).is_file() else None


# -- ours -> theirs ------------------------------------------------------------------------------

def exported_architecture(sae: SparseCoder, fmt: str) -> str:
    """The target's architecture name for this SAE; UserInputError where it has none."""
    if fmt not in FORMATS:
        raise UserInputError(f"--format {fmt}: unknown, expected one of {list(FORMATS)}")
    if sae.cfg.type == "clt":
        raise UserInputError(f"a cross-layer transcoder has no {fmt} format (circuit-tracer's CLT files assume a "
                             "TransformerLens host): its checkpoint dir is the layout to share (docs/circuits.md), "
                             "read back by sae.saes.load")
    if sae.n_sources != 1:
        raise UserInputError(f"a crosscoder ({sae.n_sources} sources) has no {fmt} format: "
                             f"{fmt} stores one-source SAEs")
    kind = sae.cfg.type
    if fmt == "sparsify":
        if kind != "topk":
            raise UserInputError(f"sparsify stores TopK SAEs only; this {'transcoder' if sae.transcoder else 'SAE'} "
                                 f"is {kind} (try --format saelens)")
        return "topk"
    if sae.transcoder:
        if kind not in SAELENS_TRANSCODERS:
            raise UserInputError(f"SAELens transcoders are ReLU (sae=vanilla) or JumpReLU (sae=jumprelu; batchtopk and "
                                 f"matryoshka at their threshold); this one is {kind}"
                                 + (": a TopK transcoder exports with --format sparsify" if kind == "topk" else ""))
        family = SAELENS_TRANSCODERS[kind]
        return (f"{family}_" if family else "") + ("skip_transcoder" if sae.cfg.skip else "transcoder")
    return {"vanilla": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
            "matryoshka": "jumprelu", "gated": "gated"}[kind]


def thresholds(sae: SparseCoder) -> torch.Tensor:
    if isinstance(sae, JumpReLUSAE):
        return sae.threshold().detach()
    return sae.threshold.detach().expand(sae.d_sae).clone()  # BatchTopK / Matryoshka at inference


def uncentred_encoder_bias(sae: SparseCoder) -> torch.Tensor:
    """b_enc for an encoder that takes x as is: a transcoder's b_enc - W_enc b_in (an SAE's b_dec centring
    stays: both libraries subtract b_dec from an SAE's input)."""
    if not sae.transcoder:
        return sae.b_enc
    return sae.b_enc - sae.W_enc[:, 0] @ sae.b_in[0]


def saelens_files(sae: SparseCoder, metadata: dict) -> tuple[dict, dict]:
    architecture = exported_architecture(sae, "saelens")
    weights = {"W_enc": sae.W_enc[:, 0].t(), "W_dec": sae.W_dec[:, 0], "b_enc": uncentred_encoder_bias(sae),
               "b_dec": sae.b_dec[0]}
    cfg = {"d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": not sae.transcoder, "normalize_activations": "none",
           "reshape_activations": "none", "metadata": metadata, "architecture": architecture}
    if sae.transcoder:
        cfg["d_out"] = sae.d_in
        if sae.cfg.skip:
            weights["W_skip"] = sae.W_skip[0]
        if architecture.startswith("jumprelu"):
            weights["threshold"] = thresholds(sae)
        return cfg, weights
    if architecture == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    if architecture == "jumprelu":
        weights["threshold"] = thresholds(sae)
    if architecture == "gated":  # SAELens names the gate's bias b_gate and has no b_enc
        weights.update(b_gate=weights.pop("b_enc"), b_mag=sae.b_mag, r_mag=sae.r_mag)
    return cfg, weights


def sparsify_files(sae: SparseCoder) -> tuple[dict, dict]:
    exported_architecture(sae, "sparsify")
    weights = {"encoder.weight": sae.W_enc[:, 0], "encoder.bias": uncentred_encoder_bias(sae),
               "W_dec": sae.W_dec[:, 0], "b_dec": sae.b_dec[0]}
    if sae.cfg.skip:
        weights["W_skip"] = sae.W_skip[0]
    cfg = {"activation": "topk", "expansion_factor": max(1, sae.d_sae // sae.d_in), "normalize_decoder": False,
           "num_latents": sae.d_sae, "k": sae.cfg.k, "multi_topk": False, "skip_connection": sae.cfg.skip,
           "transcode": sae.transcoder, "d_in": sae.d_in}
    return cfg, weights


def write_foreign(sae: SparseCoder, fmt: str, folder: Path, metadata: dict) -> None:
    """The target library's files into `folder` (which the caller creates atomically)."""
    cfg, weights = saelens_files(sae, metadata) if fmt == "saelens" else sparsify_files(sae)
    name = SAELENS_WEIGHTS if fmt == "saelens" else SPARSIFY_WEIGHTS
    save_file({k: v.detach().float().contiguous().cpu() for k, v in weights.items()}, str(folder / name))
    (folder / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")


# -- theirs -> ours ------------------------------------------------------------------------------

def load_foreign(path: Path, device: str = "cpu") -> SparseCoder:
    """A SAELens or sparsify folder as one of our SAEs (inference mode)."""
    path = Path(path)
    fmt = foreign_format(path)
    cfg = json.loads((path / "cfg.json").read_text())
    if fmt == "saelens":
        sae = _from_saelens(cfg, load_file(str(path / SAELENS_WEIGHTS)), path)
    elif fmt == "sparsify":
        sae = _from_sparsify(cfg, load_file(str(path / SPARSIFY_WEIGHTS)), path)
    else:
        raise UserInputError(f"{path}: not a SAELens (cfg.json + {SAELENS_WEIGHTS}) or sparsify "
                             f"(cfg.json + {SPARSIFY_WEIGHTS}) folder")
    return sae.to(device).eval()


def foreign_transcoder_keys(cfg: dict, skip: bool) -> dict:
    """Our config keys for a transcoder read from another library: its hooks as that library names them."""
    metadata = cfg.get("metadata") or {}
    return {"input_hookpoint": metadata.get("hook_name") or cfg.get("hookpoint") or "input",
            "target_hookpoint": metadata.get("hook_name_out") or "output", "skip": skip}


def transcoder_state(weights: dict, W_enc: torch.Tensor, b_enc: torch.Tensor, skip: torch.Tensor | None) -> dict:
    """Our state dict of a one-source transcoder whose encoder takes x as is (b_in = 0)."""
    state = {"W_enc": W_enc[:, None], "W_dec": weights["W_dec"][:, None], "b_enc": b_enc,
             "b_dec": weights["b_dec"][None], "b_in": torch.zeros_like(weights["b_dec"])[None]}
    if skip is not None:
        state["W_skip"] = skip[None]
    return {k: v.float().contiguous() for k, v in state.items()}


def _saelens_transcoder(cfg: dict, weights: dict, path: Path) -> SparseCoder:
    architecture, d_in, d_sae = cfg["architecture"], cfg["d_in"], cfg["d_sae"]
    if cfg.get("d_out", d_in) != d_in or cfg.get("normalize_activations", "none") != "none":
        raise UserInputError(f"{path}: SAELens {architecture} with d_out {cfg.get('d_out')} != d_in {d_in} or "
                             "normalised activations has no equivalent here (transcoders between hooks of one width, "
                             "raw activations)")
    skip = "W_skip" in weights
    keys = foreign_transcoder_keys(cfg, skip)
    if SAELENS_TRANSCODER_RULES[architecture] == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(sparse_dim=d_sae, **keys), 1, d_in)
    else:
        sae = VanillaSAE(VanillaSAEConfig(sparse_dim=d_sae, **keys), 1, d_in)
    state = transcoder_state(weights, weights["W_enc"].t(), weights["b_enc"], weights.get("W_skip"))
    if "threshold" in weights:
        state["log_threshold"] = weights["threshold"].float().clamp_min(torch.finfo(torch.float32).tiny).log()
    sae.load_state_dict(state)
    return sae


def _from_saelens(cfg: dict, weights: dict, path: Path) -> SparseCoder:
    architecture, d_in, d_sae = cfg.get("architecture", "standard"), cfg["d_in"], cfg["d_sae"]
    if architecture in SAELENS_TRANSCODER_RULES:
        return _saelens_transcoder(cfg, weights, path)
    unsupported = [key for key, ok in (("normalize_activations", cfg.get("normalize_activations", "none") == "none"),
                                       ("apply_b_dec_to_input", cfg.get("apply_b_dec_to_input", True)),
                                       ("rescale_acts_by_decoder_norm",
                                        architecture == "topk" or not cfg.get("rescale_acts_by_decoder_norm")))
                   if not ok]
    if unsupported or architecture not in ("standard", "topk", "jumprelu", "gated"):
        raise UserInputError(f"{path}: SAELens architecture {architecture!r} with {unsupported or 'these settings'} "
                             "has no equivalent here (supported: standard, topk, jumprelu, gated; raw activations, "
                             "b_dec subtracted from the input)")
    if architecture == "gated":
        sae = GatedSAE(GatedSAEConfig(sparse_dim=d_sae), 1, d_in)
        sae.load_state_dict({"W_enc": weights["W_enc"].t()[:, None].float().contiguous(),
                             "W_dec": weights["W_dec"][:, None].float().contiguous(),
                             "b_enc": weights["b_gate"].float(), "b_dec": weights["b_dec"][None].float(),
                             "r_mag": weights["r_mag"].float(), "b_mag": weights["b_mag"].float()})
        return sae
    if architecture == "topk":
        sae = TopKSAE(TopKSAEConfig(sparse_dim=d_sae, k=cfg["k"]), 1, d_in)
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(sparse_dim=d_sae), 1, d_in)
    else:
        sae = VanillaSAE(VanillaSAEConfig(sparse_dim=d_sae), 1, d_in)
    W_enc, W_dec, b_enc = weights["W_enc"].t(), weights["W_dec"], weights["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # TopK picks pre x ||W_dec_i|| and decodes with unit rows: fold it
        norms = W_dec.float().norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    state = {"W_enc": W_enc[:, None], "W_dec": W_dec[:, None], "b_enc": b_enc, "b_dec": weights["b_dec"][None]}
    if architecture == "jumprelu":
        threshold = weights["threshold"].float()
        if (threshold <= 0).any():  # ours keeps θ = exp(log θ) > 0; z > 0 at θ -> 0+ matches a ReLU gate
            threshold = threshold.clamp_min(torch.finfo(torch.float32).tiny)
        state["log_threshold"] = threshold.log()
    sae.load_state_dict({k: v.float().contiguous() for k, v in state.items()})
    return sae


def _from_sparsify(cfg: dict, weights: dict, path: Path) -> SparseCoder:
    if cfg.get("activation", "topk") != "topk" or cfg.get("multi_topk") or (
            cfg.get("skip_connection") and not cfg.get("transcode")):
        raise UserInputError(f"{path}: sparsify settings {cfg} have no equivalent here (TopK SAEs and transcoders, "
                             "skip connections on transcoders)")
    d_sae, d_in = weights["W_dec"].shape
    if cfg.get("transcode"):
        keys = foreign_transcoder_keys(cfg, "W_skip" in weights)
        sae = TopKSAE(TopKSAEConfig(sparse_dim=d_sae, k=cfg["k"], **keys), 1, d_in)
        sae.load_state_dict(transcoder_state(weights, weights["encoder.weight"], weights["encoder.bias"],
                                             weights.get("W_skip")))
        return sae
    sae = TopKSAE(TopKSAEConfig(sparse_dim=d_sae, k=cfg["k"]), 1, d_in)
    sae.load_state_dict({"W_enc": weights["encoder.weight"][:, None].float(),
                         "W_dec": weights["W_dec"][:, None].float(),
                         "b_enc": weights["encoder.bias"].float(), "b_dec": weights["b_dec"][None].float()})
    return sae
