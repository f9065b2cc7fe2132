"""Flow-matching math shared by training and sampling: σ sampling and shifting, noising, the model timestep,
the loss and the inference schedules. Imports only torch."""
