"""Train (or reuse from outputs/hosts/) the default host of every task and print the Markdown
table of memorisation and grokking steps that the README reports.

    python scripts/grokking_table.py                      # every task option in conf/task/
    python scripts/grokking_table.py addition division    # some of them
    python scripts/grokking_table.py conditional -- host_model.n_layers=2   # extra overrides
"""
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
from sae.config import register_configs, to_dataclass
from sae.host_models.runs import ensure_host_run, read_summary
from sae.hardware import apply_threads


def main(argv: list[str]) -> None:
    tasks, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    tasks = tasks or sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml"))
    register_configs()
    rows = []
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for task in tasks:
            cfg = to_dataclass(compose(config_name="train_host", overrides=[f"task={task}", *overrides]))
            apply_threads(cfg.hardware)
            run_dir = ensure_host_run(cfg.task, cfg.host_model, cfg.hardware.device.value)
            summary = read_summary(run_dir)
            recipe = summary["recipe"]
            rows.append(
                f"| {task} | {'+'.join(summary['task']['operations'])} | {summary['task']['p']} | "
                f"{summary['task']['train_fraction']} | "
                f"{cfg.host_model.n_layers} | {recipe['lr']:g} / {recipe['weight_decay']:g} | "
                f"{summary['memorisation_step']} | {summary['grokking_step']} | "
                f"{summary['final']['test/acc']:.3f} | {summary['wall_time_s']:.0f} s | `{run_dir}` |"
            )
            print(rows[-1], flush=True)
    print(f"\nthreads={torch.get_num_threads()}\n")
    print("| task | operations | p | train fraction | layers | lr / wd | memorised (step) | grokked (step) "
          "| final test acc | wall time | run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
