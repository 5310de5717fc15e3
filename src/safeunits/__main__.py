"""`python -m safeunits ...`: the CLI as a module, which is what launchers start in every process
(`torchrun --nproc_per_node 2 -m safeunits train ...`, `accelerate launch --multi_gpu -m safeunits ...`)."""

from safeunits.cli import main

main()
