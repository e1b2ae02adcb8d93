"""Every option of every group composes with every other; bad input fails with a message naming the key."""
import dataclasses
import json
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException

from sae.config import ConfigError, HostTrainConfig, TrainConfig, register_configs, to_dataclass
from sae.host_models.runs import host_run_key
from sae.saes import SAE_TYPES

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["task", "host_model", "sae", "scheduler", "hardware", "tracking"]
OPTIONS = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml")) for group in GROUPS}
# Tasks pair with host models by family; within a family every option composes with every other.
FAMILIES = {
    "modular": ({t for t in OPTIONS["task"] if t != "protein_mlm"}, {"transformer"}),
    "protein": ({"protein_mlm"}, {h for h in OPTIONS["host_model"] if h.startswith("esm2_")}),
}
FASTA = str(Path(__file__).resolve().parents[1] / "data" / "proteins.fasta")
DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "slurm_gpu": "cuda", "slurm_cpu": "cpu", "submitit_local": "cpu"}
register_configs()


@pytest.fixture(scope="module", autouse=True)
def hydra_context():
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield


def build(overrides: list[str], config_name: str = "config"):
    return to_dataclass(compose(config_name=config_name, overrides=overrides))


def test_every_group_has_options():
    assert all(OPTIONS[group] for group in GROUPS)
    assert set(OPTIONS["hardware"]) == set(DEVICE_OF)
    assert set(OPTIONS["task"]) == {"addition", "subtraction", "multiplication", "division", "conditional", "mixed",
                                    "protein_mlm"}
    assert set(OPTIONS["host_model"]) == {"transformer", "esm2_t6_8M", "esm2_t12_35M", "esm2_t30_150M",
                                          "esm2_t33_650M", "esm2_t36_3B"}
    assert set().union(*(tasks for tasks, _ in FAMILIES.values())) == set(OPTIONS["task"])
    assert set().union(*(hosts for _, hosts in FAMILIES.values())) == set(OPTIONS["host_model"])
    assert {build([f"sae={option}", *DEEPER_HOST.get(option, [])]).sae.type for option in OPTIONS["sae"]} == set(SAE_TYPES)


def all_pairs(option_lists: list[list[str]]) -> list[tuple[str, ...]]:
    """Greedy pairwise covering: every option of every group appears with every option of every
    other group in some row (what "every option composes with every other" needs), in far fewer
    rows than the full product."""
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(option_lists)), 2)
                 for a in option_lists[i] for b in option_lists[j]}
    rows = []
    candidates = list(itertools.product(*option_lists))
    while uncovered:
        def gain(row):
            return sum((i, row[i], j, row[j]) in uncovered for i, j in itertools.combinations(range(len(row)), 2))
        best = max(candidates, key=gain)
        rows.append(best)
        uncovered -= {(i, best[i], j, best[j]) for i, j in itertools.combinations(range(len(best)), 2)}
    return rows


# transcoder presets need the MLP hooks only the transformer host has (ESM-2 refuses them, tested
# elsewhere); a cross-layer transcoder also needs every layer of a host with two or more
TRANSCODER_PRESETS = {option for option in OPTIONS["sae"] if "transcoder" in option or option == "clt"}
DEEPER_HOST = {"clt": ["host_model.n_layers=2", "host_model.layers=[0,1]"]}


def family_rows() -> list[tuple[str, ...]]:
    rows = []
    for family, (tasks, hosts) in FAMILIES.items():
        saes = [o for o in OPTIONS["sae"] if family == "modular" or o not in TRANSCODER_PRESETS]
        rows += all_pairs([sorted(tasks), sorted(hosts), saes] + [OPTIONS[g] for g in GROUPS[3:]])
    return rows


def test_the_transcoder_presets_are_those_named_so():
    transcoders = {o for o in OPTIONS["sae"] if build([f"sae={o}", *DEEPER_HOST.get(o, [])]).sae.transcoder}
    assert TRANSCODER_PRESETS and transcoders == TRANSCODER_PRESETS


@pytest.mark.parametrize("choice", family_rows(), ids="-".join)
def test_every_option_composes_with_every_other(choice):
    extra = [f"task.fasta={FASTA}"] if choice[0] == "protein_mlm" else DEEPER_HOST.get(choice[2], [])
    cfg = build([f"{group}={option}" for group, option in zip(GROUPS, choice)] + extra)
    assert cfg.host_model.name == choice[1]
    assert isinstance(cfg, TrainConfig)
    assert cfg.task.name == choice[0]
    assert choice[2].startswith(cfg.sae.type) or (choice[2] in TRANSCODER_PRESETS and cfg.sae.transcoder)
    assert cfg.scheduler.name.value == choice[3] and cfg.hardware.device.value == DEVICE_OF[choice[4]]
    assert cfg.tracking.mode.value == choice[5]


@pytest.mark.parametrize("task, host", [("protein_mlm", "transformer"), ("addition", "esm2_t6_8M")])
def test_a_task_with_another_family_s_host_fails_with_one_line(task, host):
    with pytest.raises(ConfigError, match=f"task={task} needs .*, got host_model={host}$"):
        build([f"task={task}", f"host_model={host}"] + ([f"task.fasta={FASTA}"] if task == "protein_mlm" else []))


@pytest.mark.parametrize("task", sorted(FAMILIES["modular"][0]))
def test_host_training_config_composes(task):
    cfg = build([f"task={task}"], config_name="train_host")
    assert isinstance(cfg, HostTrainConfig) and cfg.task.name == task


def test_readme_example_composes():
    cfg = build(["task=division", "sae=topk", "sae.k=50"])
    assert cfg.sae.k == 50 and [o.value for o in cfg.task.operations] == ["division"]


def test_sources_are_lists_and_checkpoint_is_a_shorthand():
    cfg = build(["host_model.n_layers=2", "host_model.layers=[0,1]", "host_model.checkpoints=[pre_grok,post_grok]"])
    assert cfg.host_model.layers == [0, 1] and cfg.host_model.checkpoints == ["pre_grok", "post_grok"]
    assert build(["host_model.checkpoint=step_100"]).host_model.checkpoints == ["step_100"]


@pytest.mark.parametrize("overrides, message", [
    (["sae.kk=50"], "Key 'kk' not in 'TopKSAEConfig'"),
    (["sae.k=fifty"], "could not be converted to Integer"),
    (["hardware.device=gpu"], "Invalid value 'gpu', expected one of [cpu, cuda]"),
    (["task.operations=[addition,power]"], "Invalid value 'power'"),
    (["sae=vanilla", "sae.k=3"], "Key 'k' not in 'VanillaSAEConfig'"),
])
def test_hydra_rejects_bad_keys_types_and_choices(overrides, message):
    with pytest.raises(ConfigCompositionException) as error:
        build(overrides)
    assert message in str(error.value) + str(error.value.__cause__)


def test_unknown_option_lists_the_available_ones():
    with pytest.raises(MissingConfigException) as error:
        build(["sae=topkk"])
    assert "Could not find 'sae/topkk'" in str(error.value)
    assert "topk" in str(error.value) and "vanilla" in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["+sae.kk=3"], "Key 'kk' not in 'TopKSAEConfig' (full key: sae.kk)"),
    (["+host_model.train.momentum=3"], "Key 'momentum' not in 'HostRecipe' (full key: host_model.train.momentum)"),
    (["sae.k=5000", "sae.sparse_dim=2048"], "sae.k must be in (0, sae.sparse_dim=2048], got 5000"),
    (["task.p=100"], "task.p must be a prime"),
    (["host_model.layers=[1]"], "host_model.layers: layer 1 out of range [0, n_layers=1)"),
    (["scheduler.warmup_steps=2000"], "scheduler.warmup_steps must be < num_steps=2000"),
    (["host_model.checkpoints=[best]"], "host_model.checkpoints: invalid entry 'best'"),
    (["host_model.d_model=100", "host_model.n_heads=3"], "host_model.d_model=100 must be divisible by host_model.n_heads=3"),
    (["batch_size=0"], "batch_size must be > 0"),
    (["lr=nan"], "lr must be a positive finite number, got nan"),
    (["lr=-1e-3"], "lr must be a positive finite number, got -0.001"),
    (["lr_sum=0"], "lr_sum must be a positive finite number (the sum of the per-step lrs over the run) or null, got 0"),
    (["lr_sum=inf"], "lr_sum must be a positive finite number"),
    (["lr_sum=1e-323", "num_steps=10"], "lr_sum=1e-323 over num_steps=10 with scheduler=constant gives lr=0.0"),
    (["sae=topk", "sae.type=vanilla"], "sae.type is set by the sae group, not overridden: this is a topk config"),
    (["task.train_fraction=1.5"], "task.train_fraction must be in (0, 1)"),
    (["sae.resample_every=0"], "sae.resample_every must be > 0 (steps) or null (never), got 0"),
    (["sae=vanilla", "sae.resample_until=0"], "sae.resample_until must be in (0, 1] (a fraction of num_steps), got 0"),
    (["sae.resample_encoder_scale=-1"], "sae.resample_encoder_scale must be > 0, got -1"),
    (["task=protein_mlm", "host_model=esm2_t6_8M"], "task.fasta is required for task=protein_mlm: task.fasta=path"),
    (["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={FASTA}", "host_model.layers=[7]"],
     "host_model.layers: layer 7 out of range [0, 6] for esm2_t6_8M_UR50D"),
    (["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={FASTA}", "host_model.checkpoints=[model.bin]"],
     "host_model.checkpoints: invalid entry 'model.bin'"),
    (["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={FASTA}", "task.tokens_per_batch=100"],
     "task.tokens_per_batch must be >= task.max_length + 2 = 1024"),
    (["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={FASTA}", "+task.max_len=5"],
     "Key 'max_len' not in 'ProteinTaskConfig' (full key: task.max_len)"),
])
def test_schema_and_cross_field_checks_fail_with_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        build(overrides)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_experiment_presets_compose(experiment):
    assert isinstance(build([f"experiment={experiment}"]), TrainConfig)


def test_experiment_preset_sets_its_keys_and_the_command_line_still_wins():
    cfg = build(["experiment=crosscoder_pre_post_grok", "sae.k=16"])
    assert cfg.host_model.checkpoints == ["pre_grok", "post_grok"] and cfg.task.train_fraction == 0.3
    assert cfg.sae.k == 16 and cfg.sae.sparse_dim == 1024


@pytest.mark.parametrize("preset, launcher", [("slurm_gpu", "SlurmLauncher"), ("slurm_cpu", "SlurmLauncher"),
                                              ("submitit_local", "LocalLauncher")])
def test_hardware_presets_own_the_launcher(preset, launcher, monkeypatch):
    from omegaconf import OmegaConf

    monkeypatch.setenv("SLURM_PARTITION", "gpu-a100")
    monkeypatch.delenv("SLURM_ACCOUNT", raising=False)
    cfg = compose(config_name="config", overrides=[f"hardware={preset}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(launcher)
    if launcher == "SlurmLauncher":
        assert cfg.hydra.launcher.partition == "gpu-a100" and cfg.hydra.launcher.account is None
        assert cfg.hydra.launcher.max_num_timeout > 0  # submitit requeues only then
    plain = compose(config_name="config", return_hydra_config=True)
    assert "submitit" not in OmegaConf.select(plain, "hydra.launcher._target_")  # plain runs keep the basic launcher


@pytest.mark.parametrize("experiment, swept", [
    ("sweep_sparse_dim", {"sae.sparse_dim": "1024,2048,4096"}), ("sweep_sae_type", {"sae": "vanilla,topk_k50"}),
    ("sweep_lr", {"lr": "1e-2,1e-3,1e-4"}), ("sweep_crosscoder_grok", {"sae": "vanilla,topk", "sae.sparse_dim": "512,1024"}),
])
def test_sweep_presets_carry_their_sweep(experiment, swept):
    cfg = compose(config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True)
    assert dict(cfg.hydra.sweeper.params) == swept


def test_topk_k50_variant():
    assert build(["sae=topk_k50"]).sae.k == 50


def test_the_default_host_keeps_its_cache_name_and_a_set_grad_clip_changes_it():
    """README and users' outputs/hosts/ name the default host's dir: a recipe key added later
    (grad_clip) must not rename it while unset."""
    cfg = build(["task=addition"], config_name="train_host")
    assert host_run_key(cfg.task, cfg.host_model) == "addition_p97_860e46d298"
    clipped = dataclasses.replace(cfg.host_model, train=dataclasses.replace(cfg.host_model.train, grad_clip=1.0))
    assert host_run_key(cfg.task, clipped) != "addition_p97_860e46d298"


def test_dataclass_defaults_equal_the_composed_default_config():
    """Python and notebook users (dataclass defaults) get the run the command line gets (YAML)."""
    composed = build([])
    for group in ("task", "host_model", "sae", "scheduler", "hardware", "tracking"):
        node = getattr(composed, group)
        assert node == type(node)(), f"{group}: conf/ and the {type(node).__name__} defaults disagree"
    top = {f.name: f.default for f in dataclasses.fields(TrainConfig)
           if f.default is not dataclasses.MISSING and f.name not in ("task", "host_model")}  # those two: chosen by group
    assert {key: getattr(composed, key) for key in top} == top
    host = build([], config_name="train_host")
    assert host.host_model == type(host.host_model)() and host.task == type(host.task)()


@pytest.mark.parametrize("overrides, lr", [
    (["sae=matryoshka"], 4e-4),  # its own tuned lr (docs/recipe.md) ...
    (["sae=matryoshka", "lr=2e-3"], 2e-3),  # ... which the command line overrides
    (["lr=2e-3", "sae=matryoshka"], 2e-3),  # in either order
    (["sae=batchtopk"], 1e-3),  # the others keep the top-level lr
])
def test_an_architecture_may_carry_its_own_tuned_lr(overrides, lr):
    assert build(overrides).lr == lr


@pytest.mark.parametrize("overrides", [
    ["task=division", "sae=batchtopk", "sae.k=20", "scheduler=cosine"],
    ["task=protein_mlm", "host_model=esm2_t6_8M", f"task.fasta={FASTA}", "sae=vanilla", "host_model.layers=[2,4]"],
])
def test_a_saved_config_loads_back_as_the_same_typed_config_for_both_task_families(overrides):
    from sae.config import config_dict, config_from_dict

    cfg = build(overrides)
    saved = json.loads(json.dumps(config_dict(cfg)))  # what config.json holds
    assert config_from_dict(saved) == cfg
