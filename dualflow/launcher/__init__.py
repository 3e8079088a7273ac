"""Launching over torchrun, SLURM and MPI; distributed initialisation; preflight; configuration."""
