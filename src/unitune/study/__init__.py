"""Studies: sweeps, reports, plots and the demo."""
