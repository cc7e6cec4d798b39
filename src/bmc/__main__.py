"""`python -m bmc` (also what torchrun launches: `torchrun --nproc_per_node 2 -m bmc train`)."""

from bmc.cli.app import main

if __name__ == "__main__":
    main()
