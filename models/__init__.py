"""The embedded default experiment: MPM data and a SIREN fit. Stands alone."""
