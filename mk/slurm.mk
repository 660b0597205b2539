# One-node Slurm for the `slurm` tests (included by the main Makefile).
# make slurm-local        install if missing, start munged/slurmctld/slurmd, wait for an idle node
# make slurm-local-stop   stop the daemons that slurm-local started
# make slurm-local-status
SLURM_LOCAL := scripts/slurm_local.sh

.PHONY: slurm-local slurm-local-stop slurm-local-status
slurm-local:
	$(SLURM_LOCAL) start

slurm-local-stop:
	$(SLURM_LOCAL) stop

slurm-local-status:
	$(SLURM_LOCAL) status
