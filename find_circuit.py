#!/usr/bin/env python
"""Find which dictionary features drive which (and the logits) on a prompt, and draw them with graphviz."""

from training.circuits import CircuitConfig, run_find_circuit
from training.cli import run_cli


def main(cfg: CircuitConfig) -> None:
    """Find the circuit, write its files and say where they are."""
    circuit, paths = run_find_circuit(cfg)
    agree = circuit.info["agreement"]
    capped = " and capped by --max_edges" if len(circuit.kept) == cfg.max_edges else ""
    print(f"{len(circuit.kept)} of {len(circuit.edges)} edges kept (|effect| >= {cfg.threshold:g}{capped}), carrying "
          f"{100 * circuit.share_drawn():.1f}% of the total |effect|; attribution vs ablation: Spearman "
          f"{agree['spearman']:.3f} over {agree['n_pairs']} edges")
    print(f"wrote {paths['json']}, {paths['dot']}, {paths['svg']}; open file://{paths['html'].resolve()}")


if __name__ == "__main__":
    run_cli(main, __doc__, CircuitConfig)
