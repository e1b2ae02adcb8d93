"""Attribution-graph benchmark (docs/circuits.md): the time of one input's graph and of the direct
effects over every pair, on a CLT over the default-size host with 2 layers (the default host has one:
a CLT needs two). Trains (or reuses) the host and the CLT first.

    python scripts/benchmark_circuits.py                       # outputs/bench/circuits/
    python scripts/benchmark_circuits.py --repeats 5 --threads 2
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

from sae.analysis.circuit_study import circuit_summary
from sae.analysis.circuits import attribution_graph, logit_effects, to_float64
from sae.analysis.runs import load_sae_run, train_or_reuse
from sae.bench.dashboard import machine

CLT_RUN = ["sae=clt", "host_model.n_layers=2", "host_model.layers=[0,1]", "host_model.checkpoints=[post_grok]",
           "tracking=disabled"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("outputs/bench/circuits"))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each measurement (median)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    torch.set_num_threads(args.threads)
    run = load_sae_run(train_or_reuse(CLT_RUN, args.work / "clt"))
    host, clt = to_float64(run.data.sources[0].model, run.sae)
    dataset = run.data.dataset
    tokens, labels = dataset.tokens.cpu(), dataset.labels.cpu()
    one, every, nodes = [], [], 0
    for repeat in range(args.repeats):
        row = (repeat * 1237 + 5) % len(tokens)
        started = time.perf_counter()
        graph = attribution_graph(host, clt, int(tokens[row, 0]), int(tokens[row, 2]), tokens[row], int(labels[row]))
        one.append(time.perf_counter() - started)
        nodes = len(graph.nodes)
        started = time.perf_counter()
        logit_effects(host, clt, tokens, labels)
        every.append(time.perf_counter() - started)
    started = time.perf_counter()
    summary = circuit_summary(run)
    print(f"Machine: {machine()}, {args.threads} threads; CLT {clt.n_sources} x {clt.per_layer} latents, k {clt.cfg.k}")
    print(f"one input's graph: {statistics.median(one):.2f} s (median of {args.repeats}; {nodes} nodes, "
          f"completeness gap {graph.completeness_gap():.1e})")
    print(f"direct effects of every node on the logit, all {len(tokens)} pairs: {statistics.median(every):.2f} s")
    print(f"circuit_summary (alignment + effects + shares): {time.perf_counter() - started:.2f} s; known-algorithm "
          f"latents carry {summary['test']['known_algorithm_latents']:.1%} of the test logit")


if __name__ == "__main__":
    main()
