"""Training and scoring one run: its config (`run_config`), the loop (`train`), the data and manifest schema (`data`,
`manifest`), the run folder and its checkpoints (`run_folder`), evaluation (`evaluate`), quantizers trained alone on
latents (`latents`) and the Opus baseline (`baselines`)."""
