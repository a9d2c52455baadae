"""TPU tooling that needs no TPU: ahead-of-time compilation for TPU topologies and its
memory report, reading compiled HLO, and the roofline (FLOP/byte) model."""
